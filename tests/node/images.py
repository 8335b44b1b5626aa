#!/usr/bin/env python3
"""OCI image archives of the release binaries, for `ctr images import`, without a Docker engine.

The operator and worker images take what makes them what they are from the repository's
Dockerfile itself: for the stage of the same name, its USER, WORKDIR, ENV, EXPOSE,
ENTRYPOINT, CMD and the paths its `COPY --from=builder` lines put binaries at. So an image
built here and one built with `docker build --target <stage>` run the same binary as the
same user with the same entrypoint; a change to the Dockerfile reaches both. What the
Dockerfile's base images bring is added here as files from this machine: the C runtime the
binaries link (glibc, libm, libgcc_s, found with ldd; the worker loads CUDA libraries only
on a GPU, so the CPU image needs none), CA certificates, and a passwd entry for the user.

    images.py <out.tar> <name:tag> --stage operator|worker --bin-dir target/release
    images.py <out.tar> <name:tag> --pause bin/ilm-pause
"""

import argparse
import hashlib
import io
import json
import re
import shlex
import subprocess
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")


def dockerfile_stage(dockerfile: Path, stage: str) -> dict:
    """The runtime settings of one stage of the Dockerfile."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    current = None
    found = {"env": {}, "expose": [], "copies": [], "user": None, "workdir": None,
             "entrypoint": None, "cmd": None}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        word = word.upper()
        if word == "FROM":
            parts = rest.split()
            current = parts[-1] if len(parts) >= 3 and parts[-2].upper() == "AS" else None
            continue
        if current != stage:
            continue
        if word == "USER":
            found["user"] = rest.strip()
        elif word == "WORKDIR":
            found["workdir"] = rest.strip()
        elif word == "ENV":
            for pair in shlex.split(rest):
                key, _, value = pair.partition("=")
                found["env"][key] = value
        elif word == "EXPOSE":
            found["expose"] += rest.split()
        elif word in ("ENTRYPOINT", "CMD"):
            found[word.lower()] = json.loads(rest)
        elif word == "COPY" and rest.startswith("--from=builder"):
            src, dest = rest.split()[1:3]
            found["copies"].append((Path(src).name, dest))
    if not found["copies"]:
        raise SystemExit(f"no stage {stage!r} with COPY --from=builder in {dockerfile}")
    if not found["user"] or not found["entrypoint"]:
        raise SystemExit(f"stage {stage!r} of {dockerfile} sets no USER or ENTRYPOINT")
    return found


def shared_libraries(binary: Path) -> list[Path]:
    """The libraries the dynamic loader maps for `binary`, the loader itself included."""
    out = subprocess.run(["ldd", str(binary)], check=True, capture_output=True, text=True).stdout
    libs = []
    for line in out.splitlines():
        match = re.search(r"(/\S+)\s+\(0x", line)
        if match:
            libs.append(Path(match.group(1)))
    return libs


class Layer:
    """One uncompressed layer tar, written in memory."""

    def __init__(self):
        self.buf = io.BytesIO()
        self.tar = tarfile.open(fileobj=self.buf, mode="w", format=tarfile.PAX_FORMAT)
        self.dirs = set()

    def _parents(self, path: str):
        parts = Path(path).parts[1:-1]
        for i in range(1, len(parts) + 1):
            self.dir("/" + "/".join(parts[:i]))

    def dir(self, path: str, mode=0o755, uid=0):
        if path in self.dirs or path == "/":
            return
        self._parents(path)
        self.dirs.add(path)
        info = tarfile.TarInfo(path.lstrip("/"))
        info.type, info.mode, info.uid, info.gid = tarfile.DIRTYPE, mode, uid, uid
        self.tar.addfile(info)

    def file(self, path: str, data: bytes, mode=0o644):
        self._parents(path)
        info = tarfile.TarInfo(path.lstrip("/"))
        info.size, info.mode = len(data), mode
        self.tar.addfile(info, io.BytesIO(data))

    def symlink(self, path: str, target: str):
        self._parents(path)
        info = tarfile.TarInfo(path.lstrip("/"))
        info.type, info.linkname = tarfile.SYMTYPE, target
        self.tar.addfile(info)

    def host_file(self, src: Path, dest: str, mode=None):
        """A file of this machine, following symlinks; a library keeps its soname link."""
        real = src.resolve()
        self.file(str(Path(dest).parent / real.name), real.read_bytes(),
                  mode if mode is not None else real.stat().st_mode & 0o777)
        if real.name != Path(dest).name:
            self.symlink(dest, real.name)

    def close(self) -> bytes:
        self.tar.close()
        return self.buf.getvalue()


def blob(blobs: dict, data: bytes) -> str:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    blobs[digest] = data
    return digest


def write_archive(out: Path, name: str, layer: bytes, config: dict):
    """An OCI image layout in a tar; containerd names the image from the index annotation."""
    blobs = {}
    layer_digest = blob(blobs, layer)
    config["rootfs"] = {"type": "layers", "diff_ids": [layer_digest]}
    config.update({"architecture": "amd64", "os": "linux"})
    config_bytes = json.dumps(config, sort_keys=True).encode()
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": blob(blobs, config_bytes), "size": len(config_bytes)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": layer_digest, "size": len(layer)}],
    }
    manifest_bytes = json.dumps(manifest, sort_keys=True).encode()
    index = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": manifest["mediaType"],
            "digest": blob(blobs, manifest_bytes),
            "size": len(manifest_bytes),
            "platform": {"architecture": "amd64", "os": "linux"},
            "annotations": {"io.containerd.image.name": name,
                            "org.opencontainers.image.ref.name": name.rpartition(":")[2]},
        }],
    }
    with tarfile.open(out, "w") as tar:
        def add(path, data):
            info = tarfile.TarInfo(path)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        add("oci-layout", json.dumps({"imageLayoutVersion": "1.0.0"}).encode())
        add("index.json", json.dumps(index).encode())
        for digest, data in blobs.items():
            add("blobs/sha256/" + digest.split(":")[1], data)


def stage_image(stage: str, bin_dir: Path) -> tuple[bytes, dict]:
    spec = dockerfile_stage(REPO / "Dockerfile", stage)
    uid, _, gid = spec["user"].partition(":")
    gid = gid or uid
    # distroless' nonroot images, the operator's base, work in /home/nonroot.
    home = spec["workdir"] or "/home/nonroot"
    layer = Layer()
    libs = set()
    for name, dest in spec["copies"]:
        src = bin_dir / name
        layer.host_file(src, dest, 0o755)
        libs.update(shared_libraries(src))
    for lib in sorted(libs):
        layer.host_file(lib, str(lib))
    if CA_BUNDLE.exists():
        layer.host_file(CA_BUNDLE, str(CA_BUNDLE), 0o644)
    layer.file("/etc/passwd", f"root:x:0:0:root:/root:/sbin/nologin\n"
               f"ilm:x:{uid}:{gid}:ilm:{home}:/sbin/nologin\n".encode())
    layer.file("/etc/group", f"root:x:0:\nilm:x:{gid}:\n".encode())
    layer.dir("/tmp", 0o1777)
    layer.dir(home, 0o755, int(uid))
    env = {"PATH": DEFAULT_PATH, "SSL_CERT_FILE": str(CA_BUNDLE), **spec["env"]}
    config = {"config": {
        "User": spec["user"],
        "WorkingDir": home,
        "Env": [f"{k}={v}" for k, v in env.items()],
        "Entrypoint": spec["entrypoint"],
        "ExposedPorts": {f"{p}/tcp" if "/" not in p else p: {} for p in spec["expose"]},
    }}
    if spec["cmd"] is not None:
        config["config"]["Cmd"] = spec["cmd"]
    return layer.close(), config


def pause_image(binary: Path) -> tuple[bytes, dict]:
    layer = Layer()
    layer.host_file(binary, "/pause", 0o755)
    return layer.close(), {"config": {"User": "65535:65535", "Entrypoint": ["/pause"],
                                      "Env": [f"PATH={DEFAULT_PATH}"]}}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("name", help="image name with tag, as the Pods ask for it")
    parser.add_argument("--stage", choices=["operator", "worker"])
    parser.add_argument("--bin-dir", type=Path, default=REPO / "target" / "release")
    parser.add_argument("--pause", type=Path, help="the sandbox binary (bin/ilm-pause)")
    args = parser.parse_args()
    if args.pause:
        layer, config = pause_image(args.pause)
    elif args.stage:
        layer, config = stage_image(args.stage, args.bin_dir)
    else:
        parser.error("give --stage or --pause")
    write_archive(args.out, args.name, layer, config)
    print(f"{args.name}: {args.out} ({len(layer) >> 20} MiB)")


if __name__ == "__main__":
    main()
