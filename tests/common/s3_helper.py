#!/usr/bin/env python3
"""Looks at a moto S3 server without going through dbkeeper (used by tests/common/s3.rs).

    s3_helper.py ENDPOINT BUCKET COMMAND [ARG]

    create-bucket               creates BUCKET
    keys PREFIX                 JSON list of every key under PREFIX (all pages)
    get KEY                     the object's bytes on stdout
    put KEY                     stores stdin as KEY
    delete KEY                  deletes KEY
    uploads                     JSON list of [key, upload id] of unfinished multipart uploads
    create-multipart KEY        starts a multipart upload of KEY, uploads one 5 MiB part and
                                leaves it unfinished; prints the upload id

Errors go to stderr with a non-zero exit status.
"""

import json
import sys

import boto3
from botocore.config import Config


def main():
    endpoint, bucket, command, *args = sys.argv[1:]
    s3 = boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id="test",
        aws_secret_access_key="test",
        region_name="us-east-1",
        config=Config(proxies={}, retries={"max_attempts": 1}, connect_timeout=5, read_timeout=30),
    )
    if command == "create-bucket":
        s3.create_bucket(Bucket=bucket)
    elif command == "keys":
        keys = []
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=args[0]):
            keys.extend(o["Key"] for o in page.get("Contents", []))
        json.dump(keys, sys.stdout)
    elif command == "get":
        sys.stdout.buffer.write(s3.get_object(Bucket=bucket, Key=args[0])["Body"].read())
    elif command == "put":
        s3.put_object(Bucket=bucket, Key=args[0], Body=sys.stdin.buffer.read())
    elif command == "delete":
        s3.delete_object(Bucket=bucket, Key=args[0])
    elif command == "uploads":
        uploads = []
        for page in s3.get_paginator("list_multipart_uploads").paginate(Bucket=bucket):
            uploads.extend([u["Key"], u["UploadId"]] for u in page.get("Uploads", []))
        json.dump(uploads, sys.stdout)
    elif command == "create-multipart":
        upload = s3.create_multipart_upload(Bucket=bucket, Key=args[0])["UploadId"]
        s3.upload_part(Bucket=bucket, Key=args[0], UploadId=upload, PartNumber=1, Body=b"\0" * (5 * 2**20))
        print(upload)
    else:
        sys.exit(f"s3_helper.py: unknown command {command!r}")


if __name__ == "__main__":
    main()
