"""An S3-compatible server on loopback: moto's server mode (it installs from PyPI, so it works offline
once the test extra is installed; MinIO would need a binary download). A real HTTP server speaking
the S3 API, with a bucket created for the test and a plain client to look inside it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config

from .util import ManagedProcess, free_port, start_process, wait_started

ACCESS_KEY = "rig-access"
SECRET_KEY = "rig-secret"


class S3Server(ManagedProcess):
    """`python -m moto.server` on 127.0.0.1 and a free port, with one bucket created at start."""

    name = "moto server"

    def __init__(self, workdir: Path, bucket: str = "cargohold") -> None:
        self.workdir = Path(workdir)
        self.port = free_port()
        self.bucket = bucket
        self.log_path = self.workdir / "moto.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def storage(self, prefix: str = "", **extra: Any) -> dict[str, Any]:
        """The `storage:` section of a cargohold config for this bucket."""
        s3 = {
            "endpoint_url": self.url,
            "bucket": self.bucket,
            "region": "us-east-1",
            "access_key_id": ACCESS_KEY,
            "secret_access_key": SECRET_KEY,
            "prefix": prefix,
            **extra,
        }
        return {"backend": "s3", "s3": s3}

    def client(self) -> Any:
        return boto3.client(
            "s3",
            endpoint_url=self.url,
            region_name="us-east-1",
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            config=Config(s3={"addressing_style": "path"}),
        )

    def objects(self, prefix: str = "") -> dict[str, int]:
        """Key -> size of every object in the bucket under `prefix`."""
        found: dict[str, int] = {}
        for page in self.client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            found.update((item["Key"], item["Size"]) for item in page.get("Contents", []))
        return found

    def put(self, key: str, body: bytes) -> None:
        self.client().put_object(Bucket=self.bucket, Key=key, Body=body)

    def start(self, timeout: float = 30) -> S3Server:
        self.workdir.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)]
        self._proc = start_process(cmd, self.log_path)

        def ready() -> bool:
            client = self.client()
            if self.bucket not in {b["Name"] for b in client.list_buckets()["Buckets"]}:
                client.create_bucket(Bucket=self.bucket)
            return True

        wait_started(ready, stop=self.stop, timeout=timeout, interval=0.2, what="moto's S3 server", alive=self._dead)
        return self
