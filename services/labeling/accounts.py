"""Annotator accounts: a YAML file the team keeps, holding only hashes.

```yaml
- name: alice
  role: annotator            # or admin: also sees the stats, uploads tasks, downloads exports
  password: "scrypt$16384$8$1$<salt hex>$<hash hex>"   # python -m services.labeling.accounts password
- name: bob
  token_sha256: "<hex>"      # python -m services.labeling.accounts token  (sign in with the token alone)
```

Passwords are hashed with scrypt (``hashlib.scrypt``, salted, n=2^14, r=8, p=1); tokens are random (32 bytes) and
stored as their SHA-256. Comparisons are constant-time.
"""

from __future__ import annotations

import argparse
import enum
import getpass
import hashlib
import hmac
import secrets
import sys
from pathlib import Path

import yaml
from pydantic import Field, TypeAdapter, ValidationError, model_validator

from shared.config import ConfigError, StrictModel

SCRYPT = {"n": 2**14, "r": 8, "p": 1}


class Role(enum.StrEnum):
    ANNOTATOR = "annotator"
    ADMIN = "admin"


class Account(StrictModel):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._@-]*$")
    role: Role = Role.ANNOTATOR
    password: str = Field("", description="scrypt hash (python -m services.labeling.accounts password)")
    token_sha256: str = Field("", pattern=r"^([0-9a-f]{64})?$", description="SHA-256 of a sign-in token")

    @model_validator(mode="after")
    def _a_way_in(self):
        if not self.password and not self.token_sha256:
            raise ValueError("give password (a hash) or token_sha256")
        if self.password and not self.password.startswith("scrypt$"):
            raise ValueError("password: must be a scrypt hash from `python -m services.labeling.accounts password`")
        return self


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, **SCRYPT)
    return f"scrypt${SCRYPT['n']}${SCRYPT['r']}${SCRYPT['p']}${salt.hex()}${digest.hex()}"


def verify_password(password: str, stored: str) -> bool:
    try:
        _, n, r, p, salt, digest = stored.split("$")
        computed = hashlib.scrypt(password.encode(), salt=bytes.fromhex(salt), n=int(n), r=int(r), p=int(p))
    except ValueError:
        return False
    return hmac.compare_digest(computed.hex(), digest)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Accounts:
    def __init__(self, accounts: list[Account]):
        names = [a.name for a in accounts]
        if len(set(names)) < len(names):
            raise ConfigError(f"accounts: a name appears twice: {sorted(n for n in names if names.count(n) > 1)}")
        self.by_name = {a.name: a for a in accounts}

    @classmethod
    def load(cls, path: str | Path) -> Accounts:
        try:
            raw = yaml.safe_load(Path(path).read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"accounts_file {path}: {exc}") from exc
        try:
            accounts = TypeAdapter(list[Account]).validate_python(raw)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(x) for x in first["loc"])
            raise ConfigError(f"accounts_file {path}: item {where}: {first['msg']}") from exc
        if not accounts:
            raise ConfigError(f"accounts_file {path}: no accounts")
        return cls(accounts)

    def sign_in(self, name: str, password: str) -> Account | None:
        account = self.by_name.get(name)
        if account is None or not account.password:
            hash_password(password)  # as slow as a real check: the time says nothing about which names exist
            return None
        return account if verify_password(password, account.password) else None

    def sign_in_with_token(self, token: str) -> Account | None:
        digest = hash_token(token)
        found = None
        for account in self.by_name.values():  # no early exit
            if account.token_sha256 and hmac.compare_digest(account.token_sha256, digest):
                found = account
        return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.labeling.accounts", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    sub.add_parser("password", help="hash a password read from the terminal (or stdin)")
    sub.add_parser("token", help="a new random sign-in token and its token_sha256")
    args = parser.parse_args(argv)
    if args.what == "password":
        password = getpass.getpass("password: ") if sys.stdin.isatty() else sys.stdin.readline().rstrip("\n")
        if len(password) < 8:
            print("a password needs at least 8 characters", file=sys.stderr)
            return 2
        print(hash_password(password))
    else:
        token = secrets.token_urlsafe(32)
        print(f"token: {token}\ntoken_sha256: {hash_token(token)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
