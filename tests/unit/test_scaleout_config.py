"""The `storage` and `index` sections: defaults are one instance's files, errors name the key."""

from __future__ import annotations

import pytest

from cargohold.config import ConfigError, load_settings


def test_defaults_are_the_filesystem_and_sqlite() -> None:
    settings = load_settings(environ={})
    assert settings.storage.backend == "filesystem" and settings.storage.s3 is None
    assert settings.index.url == "sqlite" and not settings.index.redis
    assert (settings.index.peer_wait, settings.index.lease) == (60.0, 15.0)


def test_s3_and_redis_from_the_environment() -> None:
    settings = load_settings(
        environ={
            "CARGOHOLD_STORAGE__BACKEND": "s3",
            "CARGOHOLD_STORAGE__S3__BUCKET": "cache-bucket",
            "CARGOHOLD_STORAGE__S3__ENDPOINT_URL": "http://minio:9000",
            "CARGOHOLD_STORAGE__S3__PREFIX": "/mirror",
            "CARGOHOLD_STORAGE__S3__REDIRECT": "true",
            "CARGOHOLD_INDEX__URL": "redis://redis:6379/2",
            "CARGOHOLD_INDEX__PEER_WAIT": "2m",
        }
    )
    s3 = settings.storage.s3
    assert s3 is not None and (s3.bucket, s3.prefix, s3.redirect) == ("cache-bucket", "mirror/", True)
    assert settings.index.redis and settings.index.peer_wait == 120.0


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"CARGOHOLD_STORAGE__BACKEND": "s3"}, "storage: backend s3 needs an s3 section"),
        ({"CARGOHOLD_STORAGE__BACKEND": "gcs"}, "storage.backend"),
        ({"CARGOHOLD_STORAGE__S3__BUCKET": "ab"}, "storage.s3.bucket"),
        (
            {"CARGOHOLD_STORAGE__S3__BUCKET": "abc", "CARGOHOLD_STORAGE__S3__ENDPOINT_URL": "minio:9000"},
            "invalid endpoint_url",
        ),
        ({"CARGOHOLD_STORAGE__S3__BUCKET": "abc", "CARGOHOLD_STORAGE__S3__ACCESS_KEY_ID": "k"}, "go together"),
        (
            {"CARGOHOLD_STORAGE__S3__BUCKET": "abc", "CARGOHOLD_STORAGE__S3__REGON": "x"},
            "storage.s3.regon: unknown key",
        ),
        ({"CARGOHOLD_INDEX__URL": "postgres://db"}, "index.url: invalid url"),
        ({"CARGOHOLD_INDEX__LEASE": "0s"}, "index.lease"),
    ],
)
def test_bad_values_name_the_key(environ: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_settings(environ=environ)
