"""Write real Cinder backups with Cinder's own, unmodified chunked posix driver.

Runs inside the cinder venv that tools/cinder/make-cinder-backups.sh builds (never in
blockvault's environment): it imports the ``cinder`` package from PyPI and drives
``cinder.backup.drivers.posix.PosixBackupDriver`` directly on image files, the way Cinder's
own unit tests drive it (cinder/tests/unit/backup/drivers/test_backup_nfs.py): an admin
context, backup and volume rows in Cinder's real database schema (here a SQLite file made by
Cinder's own migrations, as its test fixture does), oslo.config overrides for the driver's
options, a fake messaging transport for its notifications. Nothing of the writer is
re-implemented: the bytes in OUT_DIR are what a Cinder backup service writes.

Per compression algorithm it writes a chain: a full backup and two incrementals, with
writes between them that are unaligned, cross an object boundary (``backup_file_size`` is a
few 32 KiB hash blocks, so objects are many and small), turn data into zeros and touch the
volume's last block. Usage::

    write_backups.py OUT_DIR [--algorithms zlib,zstd,bz2,none] [--file-size BYTES]

OUT_DIR/posix is Cinder's ``backup_posix_path``; the JSON written to stdout (and to
OUT_DIR/backups.json) lists, per backup, its row as Cinder exports it (``record``:
``backup_service`` and ``backup_url``, base64 of the JSON of the backup's fields, made by
``objects.Backup.encode_record`` as ``export_record`` does), its container, object prefix
(``service_metadata``), parent and the size/sha256 of the volume image at that point.
The image of each point is kept as OUT_DIR/images/<backup id>.img.

``--driver swift`` drives ``cinder.backup.drivers.swift.SwiftBackupDriver`` instead, against a
real Swift (tempauth v1, Cinder's ``single_user`` mode: ``--swift-auth-url``,
``--swift-user``, ``--swift-key``), into ``--swift-container`` (bz2's chain too: Cinder's
swift driver has no per-backup default container).

``--driver s3`` drives ``cinder.backup.drivers.s3.S3BackupDriver`` (boto3) against an S3 API
(``--s3-endpoint-url``, ``--s3-access-key``, ``--s3-secret-key``; TLS verification off for a
plain-http endpoint) into the bucket ``--s3-bucket``, which Cinder creates if missing. Cinder's
S3 driver always writes into its configured bucket (``update_container_name`` keeps it), so
every chain's ``container`` is that bucket.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import random
import shutil
import sys
import uuid
import warnings

warnings.filterwarnings("ignore")  # eventlet's deprecation banner, SQLAlchemy chatter

SHA_BLOCK = 32768
KIB = 1024


def _configure(work: str, posix_path: str, file_size: int, swift: dict | None = None,
               s3: dict | None = None) -> None:
    import oslo_messaging

    # importing these registers the options set below
    from cinder.backup import chunkeddriver  # noqa: F401
    from cinder.backup.drivers import posix  # noqa: F401
    from cinder.backup.drivers import s3 as s3_driver  # noqa: F401
    from cinder.backup.drivers import swift as swift_driver  # noqa: F401
    from cinder.common import config  # noqa: F401
    from cinder.db import api  # noqa: F401
    from oslo_config import cfg

    conf = cfg.CONF
    conf([], project="cinder", default_config_files=[])
    oslo_messaging.get_notification_transport(conf)  # registers its option group
    conf.set_override("connection", "sqlite:///" + os.path.join(work, "cinder.sqlite"),
                      group="database")
    conf.set_override("state_path", work)
    conf.set_override("lock_path", work, group="oslo_concurrency")
    conf.set_override("transport_url", "fake:/")
    conf.set_override("driver", ["noop"], group="oslo_messaging_notifications")
    conf.set_override("backup_posix_path", posix_path)
    conf.set_override("backup_file_size", file_size)
    conf.set_override("backup_sha_block_size_bytes", SHA_BLOCK)
    # the timer would need a running eventlet hub; notifications per object still go out
    conf.set_override("backup_enable_progress_timer", False)
    if swift:
        # one tempauth account for every backup (Cinder's "single_user" mode), objects of
        # backup_file_size as for posix
        conf.set_override("backup_swift_auth", "single_user")
        conf.set_override("backup_swift_auth_url", swift["auth_url"])
        conf.set_override("backup_swift_auth_version", "1")
        conf.set_override("backup_swift_user", swift["user"])
        conf.set_override("backup_swift_key", swift["key"])
        conf.set_override("backup_swift_object_size", file_size)
        conf.set_override("backup_swift_block_size", SHA_BLOCK)
        conf.set_override("backup_swift_retry_attempts", 1)
        conf.set_override("backup_swift_container", swift["container"])
    if s3:
        conf.set_override("backup_s3_endpoint_url", s3["endpoint_url"])
        conf.set_override("backup_s3_store_access_key", s3["access_key"])
        conf.set_override("backup_s3_store_secret_key", s3["secret_key"])
        conf.set_override("backup_s3_store_bucket", s3["bucket"])
        # objects of backup_file_size as for posix; a test endpoint is plain http
        conf.set_override("backup_s3_object_size", file_size)
        conf.set_override("backup_s3_block_size", SHA_BLOCK)
        conf.set_override("backup_s3_verify_ssl", s3["verify_ssl"])
        conf.set_override("backup_s3_retry_max_attempts", 1)
        # its own timer, beside backup_enable_progress_timer: it would need a running hub too
        conf.set_override("backup_s3_enable_progress_timer", False)


def _init_cinder() -> None:
    from cinder import objects, rpc
    from cinder.db import migration
    from oslo_config import cfg

    objects.register_all()
    migration.db_sync()
    rpc.init(cfg.CONF)


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while piece := f.read(1024 * 1024):
            h.update(piece)
    return h.hexdigest()


def _write(f, offset: int, data: bytes) -> None:
    f.seek(offset)
    f.write(data)


def _initial_image(path: str, size: int, rng: random.Random) -> None:
    """Random (incompressible: Cinder stores such objects with compression "none"), text
    (compressible) and zero regions, so one backup holds objects of both kinds."""
    with open(path, "wb") as f:
        f.truncate(size)
        off = 0
        kinds = ("random", "text", "zero", "text", "random")
        i = 0
        while off < size:
            n = min(size - off, (96 + 32 * (i % 3)) * KIB + 1000 * i)
            kind = kinds[i % len(kinds)]
            if kind == "random":
                _write(f, off, rng.randbytes(n))
            elif kind == "text":
                line = b"blockvault reads what cinder wrote, block %d\n" % i
                _write(f, off, (line * (n // len(line) + 1))[:n])
            off += n
            i += 1


def _changes_1(path: str, size: int, file_size: int, rng: random.Random) -> list[str]:
    with open(path, "r+b") as f:
        _write(f, 100_000, rng.randbytes(1000))  # unaligned, inside one block
        # crosses the boundary of the 2nd and 3rd data objects (and of hash blocks)
        _write(f, 2 * file_size - 5000, rng.randbytes(70 * KIB))
        # data -> zeros: whole blocks and an unaligned piece
        _write(f, 4 * file_size, bytes(64 * KIB))
        _write(f, 5 * file_size + 12_345, bytes(20_000))
        _write(f, size - 10, b"LAST-BLOCK")  # the volume's last bytes
    return ["1000 B at 100000", "70 KiB across an object boundary",
            "64 KiB of data zeroed", "20000 B zeroed unaligned", "last 10 bytes"]


def _changes_2(path: str, size: int, file_size: int, rng: random.Random) -> list[str]:
    with open(path, "r+b") as f:
        _write(f, 7, b"second incremental")  # block 0, unaligned
        # overlaps what the first incremental wrote across the object boundary
        _write(f, 2 * file_size - 2000, rng.randbytes(3000))
        # zeros over the first incremental's unaligned write
        _write(f, 99_000, bytes(4000))
        # data where the first incremental made zeros
        _write(f, 4 * file_size + 1000, rng.randbytes(5000))
        # another block's worth of change in a region untouched so far
        _write(f, 6 * file_size + SHA_BLOCK // 2, rng.randbytes(SHA_BLOCK))
        _write(f, size - 1, b"!")  # the last byte again
    return ["18 B at 7", "3000 B over inc1's boundary write", "4000 B zeroed over inc1",
            "5000 B of data in inc1's zeros", "32 KiB unaligned in a fresh region",
            "last byte"]


def _backup(ctxt, driver, volume_id: str, image: str, container: str | None,
            parent_id: str | None, name: str, service: str) -> dict:
    from cinder import objects
    from cinder.db import api as db
    from cinder.objects import fields

    backup_id = str(uuid.uuid4())
    db.backup_create(ctxt, {
        "id": backup_id,
        "size": 1,
        "container": container,
        "volume_id": volume_id,
        "parent_id": parent_id,
        "user_id": ctxt.user_id or "cinder-user",
        "project_id": ctxt.project_id or "cinder-project",
        "status": fields.BackupStatus.CREATING,
        "display_name": name,
        "display_description": "written by Cinder's PosixBackupDriver for blockvault's tests",
        "service": service,
        "availability_zone": "nova",
    })
    backup = objects.Backup.get_by_id(ctxt, backup_id)
    with open(image, "rb") as f:
        driver.backup(backup, f)
    # what the backup manager does once the driver returns (_finish_backup)
    backup = objects.Backup.get_by_id(ctxt, backup_id)
    backup.status = fields.BackupStatus.AVAILABLE
    backup.size = 1
    backup.save()
    if parent_id:
        parent = objects.Backup.get_by_id(ctxt, parent_id)
        parent.num_dependent_backups += 1
        parent.save()
    backup = objects.Backup.get_by_id(ctxt, backup_id)
    record = {
        "backup_service": backup.service,
        "backup_url": backup.encode_record(driver_info=driver.export_record(backup)),
    }
    return {
        "id": backup_id,
        "name": name,
        "parent_id": parent_id,
        "volume_id": volume_id,
        "container": backup.container,
        "service_metadata": backup.service_metadata,
        "object_count": backup.object_count,
        "size": backup.size,
        "record": record,
        "image_size": os.path.getsize(image),
        "image_sha256": _sha256(image),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir")
    ap.add_argument("--algorithms", default="zlib,zstd,bz2,none")
    ap.add_argument("--file-size", type=int, default=4 * SHA_BLOCK,
                    help="backup_file_size (a multiple of 32 KiB)")
    ap.add_argument("--image-size", type=int, default=2 * 1024 * 1024 + 12 * KIB,
                    help="bytes of each volume image (the last hash block may be partial)")
    ap.add_argument("--seed", type=int, default=13)
    ap.add_argument("--driver", choices=("posix", "swift", "s3"), default="posix",
                    help="swift: Cinder's SwiftBackupDriver against --swift-auth-url "
                         "(tempauth, v1), into --swift-container; s3: Cinder's "
                         "S3BackupDriver against --s3-endpoint-url, into --s3-bucket")
    ap.add_argument("--swift-auth-url", default="")
    ap.add_argument("--swift-user", default="test:tester")
    ap.add_argument("--swift-key", default="testing")
    ap.add_argument("--swift-container", default="volumebackups")
    ap.add_argument("--s3-endpoint-url", default="")
    ap.add_argument("--s3-access-key", default="test:tester")
    ap.add_argument("--s3-secret-key", default="testing")
    ap.add_argument("--s3-bucket", default="volumebackups")
    ap.add_argument("--s3-verify-ssl", action="store_true",
                    help="verify the endpoint's TLS certificate (Cinder's "
                         "backup_s3_verify_ssl; off by default for a plain-http test endpoint)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    out = os.path.abspath(args.out_dir)
    work, posix_path, images = (os.path.join(out, d) for d in ("cinder", "posix", "images"))
    for d in (work, posix_path, images):
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)
    swift = None
    if args.driver == "swift":
        swift = {"auth_url": args.swift_auth_url, "user": args.swift_user,
                 "key": args.swift_key, "container": args.swift_container}
    s3 = None
    if args.driver == "s3":
        s3 = {"endpoint_url": args.s3_endpoint_url, "access_key": args.s3_access_key,
              "secret_key": args.s3_secret_key, "bucket": args.s3_bucket,
              "verify_ssl": args.s3_verify_ssl}
    _configure(work, posix_path, args.file_size, swift, s3)
    _init_cinder()

    from cinder import context
    from cinder.backup.drivers import posix
    from cinder.backup.drivers import s3 as s3_driver
    from cinder.backup.drivers import swift as swift_driver
    from cinder.db import api as db
    from cinder.volume import volume_types
    from oslo_config import cfg

    ctxt = context.get_admin_context()
    ctxt.user_id, ctxt.project_id = "cinder-user", "cinder-project"
    vt = volume_types.get_default_volume_type()
    rng = random.Random(args.seed)
    result = {"cinder_version": _cinder_version(), "backup_posix_path": posix_path,
              "sha_block_size": SHA_BLOCK, "file_size": args.file_size, "chains": {},
              "driver": args.driver}
    if swift:
        service = "cinder.backup.drivers.swift.SwiftBackupDriver"
        result["swift_container"] = args.swift_container
    elif s3:
        service = "cinder.backup.drivers.s3.S3BackupDriver"
        result["s3_bucket"] = args.s3_bucket
    else:
        service = "cinder.backup.drivers.posix.PosixBackupDriver"
    for algo in [a for a in args.algorithms.split(",") if a]:
        cfg.CONF.set_override("backup_compression_algorithm", algo)
        if swift:
            driver = swift_driver.SwiftBackupDriver(ctxt)
        elif s3:
            driver = s3_driver.S3BackupDriver(ctxt)
            driver.check_for_setup_error()  # what the backup service does at start
        else:
            driver = posix.PosixBackupDriver(ctxt)
        volume_id = str(uuid.uuid4())
        db.volume_create(ctxt, {"id": volume_id, "size": 1, "status": "available",
                                "volume_type_id": vt["id"], "display_name": f"vol-{algo}",
                                "user_id": ctxt.user_id, "project_id": ctxt.project_id,
                                "metadata": {"purpose": "blockvault-cinder-import",
                                             "algorithm": algo}})
        image = os.path.join(work, f"{algo}.img")
        _initial_image(image, args.image_size, rng)
        # bz2 uses Cinder's default container (one directory per backup, nested by id);
        # the others a named container shared by the whole chain
        if swift:
            container = None if algo == "bz2" else args.swift_container
        elif s3:
            container = None  # Cinder's S3 driver puts every backup in its bucket
        else:
            container = None if algo == "bz2" else "volumebackups"
        chain = []
        steps = [("full", None, None), ("inc1", _changes_1, None), ("inc2", _changes_2, None)]
        for name, change, _ in steps:
            writes = change(image, args.image_size, args.file_size, rng) if change else []
            parent = chain[-1]["id"] if chain else None
            b = _backup(ctxt, driver, volume_id, image, container, parent, f"{algo}-{name}",
                        service)
            b["writes"] = writes
            b["algorithm"] = algo
            shutil.copyfile(image, os.path.join(images, b["id"] + ".img"))
            chain.append(b)
        result["chains"][algo] = chain
    text = json.dumps(result, indent=2, sort_keys=True)
    with open(os.path.join(out, "backups.json"), "w") as f:
        f.write(text + "\n")
    sys.stdout.write(text + "\n")
    return 0


def _cinder_version() -> str:
    from importlib.metadata import version

    return version("cinder")


if __name__ == "__main__":
    sys.exit(main())
