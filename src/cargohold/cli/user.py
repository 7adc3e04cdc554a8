"""`cargohold user add|passwd|remove|list`: edit the htpasswd file named by `auth.htpasswd`.

A running server picks the change up within seconds; no restart.
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from pathlib import Path

from cargohold.auth import htpasswd
from cargohold.config import load_settings


class UserCommandError(Exception):
    """A user command cannot be done; the message is printed as is."""


def add_user_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    user = commands.add_parser("user", help="manage the users who may log in (auth.htpasswd)")
    actions = user.add_subparsers(dest="user_command", required=True)
    for action, text in (
        ("add", "add a user"),
        ("passwd", "change a user's password"),
        ("remove", "remove a user"),
        ("list", "list the users"),
    ):
        sub = actions.add_parser(action, help=text)
        if action != "list":
            sub.add_argument("name")
        if action in ("add", "passwd"):
            sub.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
        sub.add_argument("--config", default=os.environ.get("CARGOHOLD_CONFIG"), help="YAML config file")


def _htpasswd_path(config: str | None) -> Path:
    settings = load_settings(config)
    if settings.auth is None:
        raise UserCommandError(f"{config or 'the configuration'} has no auth section (auth.htpasswd)")
    return settings.auth.htpasswd


def _read_password(from_stdin: bool) -> str:
    if from_stdin:
        password = sys.stdin.read().removesuffix("\n").removesuffix("\r")
    else:
        password = getpass.getpass("Password: ")
        if getpass.getpass("Password again: ") != password:
            raise UserCommandError("the passwords do not match")
    try:
        htpasswd.check_password(password)
    except htpasswd.PasswordError as exc:
        raise UserCommandError(str(exc)) from None
    return password


def run_user_command(args: argparse.Namespace) -> int:
    path = _htpasswd_path(args.config)
    command = args.user_command
    if command == "list":
        for name in htpasswd.list_users(path):
            print(name)
        return 0
    name = args.name
    try:
        htpasswd.check_username(name)
    except ValueError as exc:
        raise UserCommandError(str(exc)) from None
    exists = name in htpasswd.list_users(path)
    if command == "remove":
        if not htpasswd.remove_user(path, name):
            raise UserCommandError(f"no user {name!r} in {path}")
        print(f"removed {name} from {path}")
        return 0
    if command == "add" and exists:
        raise UserCommandError(f"user {name!r} already exists in {path} (use `cargohold user passwd`)")
    if command == "passwd" and not exists:
        raise UserCommandError(f"no user {name!r} in {path} (use `cargohold user add`)")
    htpasswd.set_user(path, name, htpasswd.hash_password(_read_password(args.password_stdin)))
    print(f"{'added' if command == 'add' else 'changed the password of'} {name} in {path}")
    return 0
