"""The AWS_* variables as Lance storage options for s3:// URIs (what sprint-prep reads from the environment),
shared by tools/read_store.py and tools/compare_stores.py."""
import os

_NAMES = {"AWS_ENDPOINT_URL": "aws_endpoint", "AWS_REGION": "aws_region", "AWS_ALLOW_HTTP": "allow_http",
          "AWS_ACCESS_KEY_ID": "aws_access_key_id", "AWS_SECRET_ACCESS_KEY": "aws_secret_access_key"}


def storage_options(path):
    """Storage options for `lance.dataset(path, storage_options=...)`: None for local paths."""
    if not path.startswith("s3://"):
        return None
    return {opt: os.environ[var] for var, opt in _NAMES.items() if var in os.environ} or None
