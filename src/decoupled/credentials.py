"""A tracking URI's password: handed to the store, never written or printed.

A ``user:password@`` in a URI (the config's ``tracking_uri``, ``MLFLOW_TRACKING_URI``) is taken
out where the URI comes in (``config.validate``, ``tracking.tracking_uri``, the workflow's
config): from then on the URI is the same without its password, so what is printed, logged,
passed on a command line or stored (MLflow params and tags, ``config.json``,
``experiment.json``, Snakemake's metadata) cannot hold it. The password goes to this process's
environment (``DECOUPLED_TRACKING_PASSWORDS``, by the URI it belongs to), which the jobs and
workers it starts inherit, and is put back only into that URI when it is given to MLflow's
client (``with_password``).

The stores' own ways need no password in the config at all: PostgreSQL's ``PGPASSWORD`` and
``~/.pgpass`` (``PGPASSFILE``), an MLflow server's ``MLFLOW_TRACKING_USERNAME`` and
``MLFLOW_TRACKING_PASSWORD`` (docs/tracking.md).
"""

from __future__ import annotations

import json
import os
import re

PASSWORDS_ENV = "DECOUPLED_TRACKING_PASSWORDS"  # JSON: {the URI without its password: the password}
# scheme://user:password@ (the password may be empty); the user is kept, the password is not
_USER_AND_PASSWORD = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.-]*://[^:@/\s]*):(?P<password>[^@/\s]*)@")


def _passwords() -> dict[str, str]:
    try:
        known = json.loads(os.environ.get(PASSWORDS_ENV, "{}"))
    except json.JSONDecodeError:
        return {}
    return known if isinstance(known, dict) else {}


def without_password(uri: str) -> str:
    """``uri`` without its password, which goes to the environment for the store's client (and
    the processes this one starts); a URI without one is returned as it is."""
    match = _USER_AND_PASSWORD.match(uri)
    if match is None:
        return uri
    public = match["head"] + "@" + uri[match.end() :]
    os.environ[PASSWORDS_ENV] = json.dumps({**_passwords(), public: match["password"]})
    return public


def with_password(uri: str) -> str:
    """The URI to connect with: the password taken out of this very URI put back, if it had one."""
    password = _passwords().get(uri)
    if password is None:
        return uri
    scheme, _, rest = uri.partition("://")
    user, _, where = rest.partition("@")
    return f"{scheme}://{user}:{password}@{where}"


def redact(text: str) -> str:
    """``text`` with the password of every ``scheme://user:password@`` in it shown as ***."""
    return _USER_AND_PASSWORD.sub(lambda m: f"{m['head']}:***@", text)
