"""The store's lease on S3: conditional writes through boto3 (see ``data_store.lease``).

pyarrow's S3 filesystem cannot write conditionally, so the lease object alone goes through boto3:
create with ``If-None-Match: *``, renew and take over with ``If-Match: <etag>``, release with a
conditional delete. A service that ignores the conditions is caught by a probe when a lease is
first taken at an endpoint and bucket, and refused rather than trusted.
"""

from __future__ import annotations

import contextlib
from typing import Any

from subq.data_store.store import StoreError


class S3LeaseBackend:
    """Conditional writes on S3 (``If-None-Match`` / ``If-Match``); the version is the ETag.

    Credentials, region and endpoint come from boto3's usual sources (``AWS_ACCESS_KEY_ID``,
    ``AWS_ENDPOINT_URL``, ...); an ``endpoint_override`` / ``scheme`` / ``region`` in the store URI's
    query wins, as it does for pyarrow. Nothing of them is written anywhere."""

    _probed: set[str] = set()  # endpoints+buckets whose conditional writes were checked

    def __init__(self, uri: str, root: str, name: str):
        try:
            import boto3
            import botocore.exceptions
        except ImportError:
            raise StoreError("a store on s3:// needs boto3 for its lease (conditional writes): "
                             "pip install 'subq[s3]'") from None
        from urllib.parse import parse_qs, urlparse

        query = {k: v[-1] for k, v in parse_qs(urlparse(uri).query).items()}
        endpoint = query.get("endpoint_override")
        if endpoint and "://" not in endpoint:
            endpoint = f"{query.get('scheme', 'https')}://{endpoint}"
        self.bucket, _, prefix = root.partition("/")
        self.key = f"{prefix}/{name}" if prefix else name
        self.client = boto3.client("s3", endpoint_url=endpoint, region_name=query.get("region"))
        self._errors = botocore.exceptions.ClientError
        self.ident = f"{self.client.meta.endpoint_url}/{self.bucket}/{self.key}"
        self.where = f"s3://{self.bucket}/{self.key}"

    def _code(self, e: Exception) -> str:
        return str(getattr(e, "response", {}).get("Error", {}).get("Code", ""))

    def _conflict(self, e: Exception) -> bool:
        return self._code(e) in ("PreconditionFailed", "ConditionalRequestConflict", "412", "409")

    def _unsupported(self, e: Exception, header: str) -> StoreError:
        return StoreError(f"the object store refused a conditional write ({header}: {self._code(e)}) for "
                          f"{self.where}; the store's lease needs an S3 service with conditional writes")

    def read(self) -> tuple[bytes | None, Any]:
        try:
            r = self.client.get_object(Bucket=self.bucket, Key=self.key)
        except self._errors as e:
            if self._code(e) in ("NoSuchKey", "404"):
                return None, None
            raise
        return r["Body"].read(), r["ETag"]

    def create(self, data: bytes) -> Any:
        try:
            etag = self.client.put_object(Bucket=self.bucket, Key=self.key, Body=data, IfNoneMatch="*")["ETag"]
        except self._errors as e:
            if self._conflict(e):
                return None
            if self._code(e) in ("NotImplemented", "501", "InvalidArgument", "400"):
                raise self._unsupported(e, "If-None-Match") from None
            raise
        self._probe(data, etag)
        return etag

    def _probe(self, data: bytes, etag: str) -> None:
        """Check once per endpoint and bucket that the service honours both conditions: a write
        that must be refused. A service that ignores them would let two runs hold the lease."""
        if self.ident in self._probed:
            return
        for header, cond in (("If-None-Match", {"IfNoneMatch": "*"}), ("If-Match", {"IfMatch": '"0"'})):
            try:
                self.client.put_object(Bucket=self.bucket, Key=self.key, Body=data, **cond)
            except self._errors as e:
                if self._conflict(e):
                    continue
                raise self._unsupported(e, header) from None
            with contextlib.suppress(self._errors):
                self.client.delete_object(Bucket=self.bucket, Key=self.key)
            raise StoreError(f"the object store at {self.client.meta.endpoint_url} ignores conditional writes "
                             f"({header}); two runs could both hold the lease {self.where}, so it is not used")
        self._probed.add(self.ident)

    def replace(self, data: bytes, version: Any) -> Any:
        try:
            return self.client.put_object(Bucket=self.bucket, Key=self.key, Body=data, IfMatch=version)["ETag"]
        except self._errors as e:
            if self._conflict(e) or self._code(e) in ("NoSuchKey", "404"):
                return None
            raise

    def delete(self, version: Any) -> bool:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self.key, IfMatch=version)
        except self._errors as e:
            if self._conflict(e) or self._code(e) in ("NoSuchKey", "404"):
                return False
            raise
        return True
