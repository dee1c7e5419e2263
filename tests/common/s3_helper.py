#!/usr/bin/env python3
"""Looks at a moto S3 server without going through dbkeeper (used by tests/common/s3.rs).

    s3_helper.py [--env] ENDPOINT BUCKET COMMAND [ARG]

    --env       a real bucket (DBKEEPER_TEST_S3_BUCKET): the credentials and region of
                the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
                AWS_SESSION_TOKEN, AWS_REGION or AWS_DEFAULT_REGION …) instead of
                moto's; an empty ENDPOINT then means the AWS default

    create-bucket               creates BUCKET
    keys PREFIX                 JSON list of every key under PREFIX (all pages)
    get KEY                     the object's bytes on stdout
    put KEY                     stores stdin as KEY
    delete KEY                  deletes KEY
    uploads [PREFIX]            JSON list of [key, upload id] of unfinished multipart uploads
                                (under PREFIX)
    create-multipart KEY        starts a multipart upload of KEY, uploads one 5 MiB part and
                                leaves it unfinished; prints the upload id
    clean PREFIX                deletes every object under PREFIX and aborts its unfinished
                                multipart uploads (PREFIX "" : the whole bucket)

Errors go to stderr with a non-zero exit status.
"""

import json
import os
import sys

import boto3
from botocore.config import Config


def main():
    argv = sys.argv[1:]
    real = argv[:1] == ["--env"]
    if real:
        argv = argv[1:]
    endpoint, bucket, command, *args = argv
    if real:
        # boto3 finds the credentials itself (variables, profile, instance role); the
        # region it reads only from AWS_DEFAULT_REGION, dbkeeper from AWS_REGION too.
        s3 = boto3.client(
            "s3",
            endpoint_url=endpoint or None,
            region_name=os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION"),
            config=Config(retries={"max_attempts": 3}, connect_timeout=10, read_timeout=60),
        )
    else:
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
        prefix = args[0] if args else ""
        for page in s3.get_paginator("list_multipart_uploads").paginate(Bucket=bucket, Prefix=prefix):
            uploads.extend([u["Key"], u["UploadId"]] for u in page.get("Uploads", []))
        json.dump(uploads, sys.stdout)
    elif command == "clean":
        clean(s3, bucket, args[0])
    elif command == "create-multipart":
        upload = s3.create_multipart_upload(Bucket=bucket, Key=args[0])["UploadId"]
        s3.upload_part(Bucket=bucket, Key=args[0], UploadId=upload, PartNumber=1, Body=b"\0" * (5 * 2**20))
        print(upload)
    else:
        sys.exit(f"s3_helper.py: unknown command {command!r}")


def clean(s3, bucket, prefix):
    """Aborts the unfinished uploads under PREFIX, then deletes its objects (pages of
    up to 1000 keys, one DeleteObjects each); fails if anything could not be removed."""
    failed = []
    for page in s3.get_paginator("list_multipart_uploads").paginate(Bucket=bucket, Prefix=prefix):
        for u in page.get("Uploads", []):
            try:
                s3.abort_multipart_upload(Bucket=bucket, Key=u["Key"], UploadId=u["UploadId"])
            except s3.exceptions.NoSuchUpload:
                pass  # finished or aborted meanwhile
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
        if keys:
            done = s3.delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})
            failed.extend(f"{e['Key']}: {e.get('Code')} {e.get('Message')}" for e in done.get("Errors", []))
    if failed:
        sys.exit("s3_helper.py: could not delete " + "; ".join(failed))


if __name__ == "__main__":
    main()
