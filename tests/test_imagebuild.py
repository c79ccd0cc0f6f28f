"""The image builder through the real kernel, runtime, FUSE mount and package registries.

The Debian base (mmdebstrap, ~1 minute) is built once into a store kept between sessions
($COLDBREW_TEST_IMAGE_CACHE, default /var/cache/coldbrew-test/imagebuild): the product's own step cache finds it
there by its key, and each session's store starts as hard links of that one. Every other step is built for real in
each session: a step with a per-session nonce comes before the apt and pip steps.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from conftest import coldbrew, run_through_files

from coldbrew.fs.index import Index
from coldbrew.fs.layer import push_layer
from coldbrew.fs.mounts import mount_overlay, umount
from coldbrew.fs.pushing import push
from coldbrew.fs.store import LocalStore, open_store
from coldbrew.imagebuild import BuildError, Image, ImageBuildError, ImageDefinitionError, RegistryAccess
from coldbrew.imagebuild.build import dedupe_report, load_index, lookup_path

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/fuse"),
                                reason="needs root and /dev/fuse")

IMAGE_CACHE = Path(os.environ.get("COLDBREW_TEST_IMAGE_CACHE", "/var/cache/coldbrew-test/imagebuild"))
NONCE = uuid.uuid4().hex


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = run_through_files([sys.executable, "-m", "coldbrew.imagebuild.cli", *args])
    if check and result.returncode != 0:
        raise AssertionError(f"coldbrew image {' '.join(args)} exited {result.returncode}: {result.stderr}")
    return result


def mounts_under(path: Path) -> list[str]:
    with open("/proc/self/mountinfo") as mountinfo:
        return [line.split()[4] for line in mountinfo if line.split()[4].startswith(str(path))]


class Builder:
    """Builds into this session's store with a test's runtime root and work directory."""

    def __init__(self, store: Path, cache: Path, work: Path, runtime_root: str) -> None:
        self.store, self.cache, self.work, self.runtime_root = store, cache, work, runtime_root

    def build(self, image: Image, **options):
        return image.build(str(self.store), cache_dir=str(self.cache), work_dir=str(self.work),
                           runtime_root=self.runtime_root, **options)


@pytest.fixture(scope="session")
def base_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The persistent store holding the Debian base; built here the first time (its time is printed)."""
    store = IMAGE_CACHE / "store"
    started = time.monotonic()
    result = Image.debian_slim().build(str(store), work_dir=str(tmp_path_factory.mktemp("base-work")),
                                       cache_dir=str(tmp_path_factory.mktemp("base-cache")))
    if not result.steps[0].cached:
        sys.stderr.write(f"\nimagebuild tests: built the Debian base in {time.monotonic() - started:.1f} s "
                         f"into {store}\n")
    return store


@pytest.fixture(scope="session")
def session_store(base_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """This session's store: hard links of the persistent one (objects are immutable, records are replaced by
    rename, so neither store ever changes the other)."""
    store = tmp_path_factory.mktemp("imagebuild") / "store"
    shutil.copytree(base_store, store, copy_function=os.link)
    yield store
    shutil.rmtree(store, ignore_errors=True)


@pytest.fixture(scope="session")
def chunk_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("chunk-cache")


@pytest.fixture
def builder(session_store: Path, chunk_cache: Path, tmp_path: Path, runtime_root: str) -> Builder:
    work = tmp_path / "work"
    yield Builder(session_store, chunk_cache, work, runtime_root)
    assert not mounts_under(work), "build mounts left behind"
    assert not work.exists() or not os.listdir(work), f"build directories left behind: {os.listdir(work)}"


def packages_image(app: Path) -> Image:
    return (Image.debian_slim()
            .run_commands(f"echo {NONCE} packages > /etc/coldbrew-test-session")
            .apt_install("jq")
            .pip_install("six")
            .env({"COLDBREW_TEST": "yes"})
            .add_local_dir(str(app), "/app")
            .workdir("/app")
            .cmd(["python3", "main.py"]))


@pytest.fixture(scope="session")
def app_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    app = tmp_path_factory.mktemp("app")
    (app / "main.py").write_text("import six\nprint('app', six.__version__)\n")
    return app


def run_bundle(store: Path, cache: Path, reference: str, tmp_path: Path, runtime_root: str, cid: str,
               command: str) -> str:
    """`coldbrew image bundle` of the image with `command`, run with `coldbrew run`; its output."""
    bundle = tmp_path / "bundle"
    try:
        cli("bundle", reference, str(bundle), "--store", str(store), "--cache", str(cache), "--", "sh", "-c", command)
        config = json.loads((bundle / "config.json").read_text())
        assert config["root"] == {"path": "rootfs", "readonly": False}
        result = coldbrew(runtime_root, "run", "--bundle", str(bundle), cid)
        return result.stdout
    finally:
        if (bundle / "config.json").exists():
            cli("rm-bundle", str(bundle))
        assert not mounts_under(bundle)
        assert not bundle.exists()


# --- real builds ----------------------------------------------------------------------------------------------

def test_build_apt_and_pip_then_run_the_image(builder: Builder, app_dir: Path, tmp_path: Path, runtime_root: str,
                                              cid: str) -> None:
    result = builder.build(packages_image(app_dir))
    steps = result.steps
    assert steps[0].cached, "the Debian base comes from the persistent store"
    assert not any(step.cached for step in steps[1:])
    assert [step.containers for step in steps[1:4]] == [1, 1, 1]  # the commands ran in containers
    assert [step.containers for step in steps[4:]] == [0, 0, 0, 0]  # files and config: no container
    assert result.config.working_dir == "/app" and "COLDBREW_TEST=yes" in result.config.env
    assert result.config.cmd == ("python3", "main.py")

    store = open_store(str(builder.store))
    index = load_index(store, result.reference)
    try:
        assert lookup_path(index, "/usr/bin/jq") is not None
        assert lookup_path(index, "/app/main.py") is not None
        # what a build container saw of the host to reach the registries is not in the image
        assert lookup_path(index, "/run/coldbrew-build") is None
        assert lookup_path(index, "/opt/wheels") is None
        assert index.metadata["image_config"]["working_dir"] == "/app"
    finally:
        index.release()

    output = run_bundle(builder.store, builder.cache, result.reference, tmp_path, runtime_root, cid,
                        'echo "env=$COLDBREW_TEST"; pwd; jq --version; python3 -c "import six"; echo six=$?; '
                        "python3 main.py")
    lines = output.split("\n")
    assert "env=yes" in lines and "/app" in lines and "six=0" in lines
    assert any(line.startswith("jq-1.") for line in lines)
    assert any(line.startswith("app 1.") for line in lines)

    dedupe = dedupe_report(store, [step.reference for step in steps])
    assert dedupe.tree_bytes > 5 * dedupe.unique_bytes, "unchanged files across steps are stored once"


def test_second_build_is_all_cache_hits(builder: Builder, app_dir: Path) -> None:
    builder.build(packages_image(app_dir))  # built by the previous test already; builds here when run alone
    result = builder.build(packages_image(app_dir))
    assert all(step.cached for step in result.steps)
    assert result.containers == 0  # nothing ran: every step came from the cache


def test_changed_middle_step_rebuilds_from_it(builder: Builder) -> None:
    def image(text: str) -> Image:
        return (Image.debian_slim().run_commands(f"echo {NONCE} > /etc/coldbrew-test-session")
                .run_commands("echo one > /one").run_commands(f"echo {text} > /two").env({"LAST": "step"}))

    first = builder.build(image("two"))
    again = builder.build(image("two"))
    assert [step.cached for step in again.steps] == [True] * 5
    changed = builder.build(image("changed"))
    assert [step.cached for step in changed.steps] == [True, True, True, False, False]
    assert [step.containers for step in changed.steps] == [0, 0, 0, 1, 0]
    assert changed.reference != first.reference

    forced = builder.build(image("two").run_commands("true", force_build=True))
    assert [step.cached for step in forced.steps] == [True] * 5 + [False]


def test_force_build_of_the_whole_image(builder: Builder, rootfs: Path) -> None:
    image = Image.from_dir(str(rootfs)).run_commands("echo x > /x").env({"A": "1"})
    builder.build(image)
    assert all(step.cached for step in builder.build(image).steps)
    forced = builder.build(image, force_build=True)
    assert not any(step.cached for step in forced.steps)
    assert forced.containers == 1


def test_force_build_of_a_step_rebuilds_what_follows_when_it_changes(builder: Builder) -> None:
    steps = Image.debian_slim().run_commands(f"echo {NONCE} > /etc/coldbrew-test-session")
    builder.build(steps.run_commands("date +%s%N > /stamp").env({"A": "1"}))
    forced = builder.build(steps.run_commands("date +%s%N > /stamp", force_build=True).env({"A": "1"}))
    # the rebuilt step wrote another stamp: its image differs, so the env step after it misses too
    assert [step.cached for step in forced.steps] == [True, True, False, False]


def test_add_local_dir_content_is_the_cache_key(builder: Builder, tmp_path: Path) -> None:
    source = tmp_path / "src"
    (source / "pkg").mkdir(parents=True)
    (source / "pkg" / "data.txt").write_text("first")
    os.symlink("pkg/data.txt", source / "link")
    image = Image.debian_slim().add_local_dir(str(source), "/srv/app").workdir("/srv/app")

    def content(result) -> tuple[bytes, str]:
        store = open_store(str(builder.store))
        index = load_index(store, result.reference)
        try:
            ino = lookup_path(index, "/srv/app/pkg/data.txt")
            chunks = index.chunks(ino)
            attributes = index.attributes(ino)
            assert (attributes.uid, attributes.gid) == (0, 0)
            link = index.symlink_target(lookup_path(index, "/srv/app/link")).decode()
            from coldbrew.fs import objects

            data = b"".join(objects.decode(chunk.digest, store.get(chunk.digest), chunk.length) for chunk in chunks)
            return data, link
        finally:
            index.release()

    first = builder.build(image)
    assert content(first) == (b"first", "pkg/data.txt")
    os.utime(source / "pkg" / "data.txt", (1, 1))  # a new time alone is no new content
    assert all(step.cached for step in builder.build(image).steps)
    (source / "pkg" / "data.txt").write_text("second")
    second = builder.build(image)
    assert [step.cached for step in second.steps] == [True, False, False]
    assert content(second) == (b"second", "pkg/data.txt")


def test_failing_step_names_itself_and_leaves_nothing(builder: Builder, runtime_root: str) -> None:
    image = (Image.debian_slim().run_commands(f"echo {NONCE} > /etc/coldbrew-test-session")
             .run_commands("true", "echo about to fail; echo on stderr >&2; exit 3"))
    with pytest.raises(BuildError) as caught:
        builder.build(image)
    error = caught.value
    assert error.exit_status == 3 and error.number == 3
    message = str(error)
    assert "step 3 (run_commands true && echo about to fail" in message
    assert "command 2 of 2 exited with status 3" in message
    assert "about to fail" in message and "on stderr" in message
    assert not os.path.exists(runtime_root) or not os.listdir(runtime_root)
    # (the builder fixture checks that no mount and no step directory is left)


def test_step_timeout_kills_the_step(builder: Builder) -> None:
    image = (Image.debian_slim().run_commands(f"echo {NONCE} > /etc/coldbrew-test-session")
             .run_commands("sleep 60"))
    started = time.monotonic()
    with pytest.raises(BuildError, match="timed out"):
        builder.build(image, step_timeout=1.0)
    assert time.monotonic() - started < 30


def test_pip_install_from_requirements(builder: Builder, tmp_path: Path) -> None:
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("idna\n")
    image = (Image.debian_slim().run_commands(f"echo {NONCE} > /etc/coldbrew-test-session")
             .pip_install_from_requirements(str(requirements)).run_commands("python3 -c 'import idna'"))
    first = builder.build(image)
    assert [step.cached for step in first.steps][2:] == [False, False]
    index = load_index(open_store(str(builder.store)), first.reference)
    try:
        assert lookup_path(index, "/usr/local/lib/python3.11/dist-packages/idna/__init__.py") is not None
        assert lookup_path(index, "/run/coldbrew-build") is None
    finally:
        index.release()
    assert all(step.cached for step in builder.build(image).steps)
    requirements.write_text("idna\nsix\n")
    assert [step.cached for step in builder.build(image).steps] == [True, True, False, False]


def test_registry_access_is_explicit_and_overridable(builder: Builder) -> None:
    host = RegistryAccess.from_host()
    if os.path.isfile("/etc/ssl/certs/ca-certificates.crt"):
        assert host.ca_bundle is not None and "SSL_CERT_FILE" in host.ca_variables
    described = host.describe()
    assert "host network namespace" in described
    # with the host's access (the default), a step verifies the registry's certificate as the host does
    verified = (Image.debian_slim().run_commands(f"echo {NONCE} > /etc/coldbrew-test-session")
                .run_commands("python3 -c \"import urllib.request; "
                              "print('status', urllib.request.urlopen('https://pypi.org/simple/six/').status)\""))
    log = builder.work.parent / "verified.log"
    with open(log, "w") as file:
        builder.build(verified, log=file)
    assert "  | status 200" in log.read_text()
    assert f"CA bundle {host.ca_bundle} -> /run/coldbrew-build/ca-certificates.crt" in log.read_text()
    # with no access at all, pip in a build container sees no local wheel folders, no index settings, no CA
    image = (Image.debian_slim().run_commands(f"echo {NONCE} > /etc/coldbrew-test-session")
             .run_commands("env | grep -E '^(PIP_|SSL_CERT_FILE|APT_CONFIG)' || echo none; "
                           "test -e /opt/wheels && echo wheels || echo no-wheels; cat /etc/resolv.conf | wc -c",
                           force_build=True))
    log = builder.work.parent / "build.log"
    with open(log, "w") as file:
        builder.build(image, access=RegistryAccess(), log=file)
    output = log.read_text()
    assert "  | none" in output and "  | no-wheels" in output and "  | 0" in output
    with pytest.raises(ImageBuildError, match="ca_bundle /nonexistent is not a file"):
        builder.build(image, access=RegistryAccess(ca_bundle="/nonexistent"))


def test_cli_build_ls_bundle(session_store: Path, chunk_cache: Path, app_dir: Path, tmp_path: Path,
                             runtime_root: str, cid: str) -> None:
    definition = tmp_path / "images.py"
    definition.write_text(f"from coldbrew.imagebuild import Image\n"
                          f"web = (Image.debian_slim().run_commands('echo {NONCE} > /etc/coldbrew-test-session')\n"
                          f"       .add_local_file('hello.txt', '/srv/hello.txt').env({{'MODE': 'cli'}})\n"
                          f"       .workdir('/srv').entrypoint(['cat']).cmd(['hello.txt']))\n")
    (tmp_path / "hello.txt").write_text("hello from the image\n")
    common = ["--store", str(session_store), "--cache", str(chunk_cache), "--work-dir", str(tmp_path / "work")]
    built = cli("build", f"{definition}:web", *common, "--json")
    result = json.loads(built.stdout)
    assert len(result["reference"]) == 64 and result["name"] == "web"
    assert result["config"]["working_dir"] == "/srv"
    again = json.loads(cli("build", f"{definition}:web", *common, "--json").stdout)
    assert again["reference"] == result["reference"] and all(step["cached"] for step in again["steps"])

    listing = json.loads(cli("ls", "--store", str(session_store), "--json").stdout)
    assert {"name": "web", "reference": result["reference"]}.items() <= next(
        image for image in listing if image["name"] == "web").items()
    assert "web" in cli("ls", "--store", str(session_store)).stdout

    bundle = tmp_path / "bundle"
    try:
        cli("bundle", "web", str(bundle), "--store", str(session_store), "--cache", str(chunk_cache))
        config = json.loads((bundle / "config.json").read_text())
        assert config["process"]["args"] == ["cat", "hello.txt"] and config["process"]["cwd"] == "/srv"
        assert result["config"]["entrypoint"] == ["cat"] and result["config"]["cmd"] == ["hello.txt"]
        assert "MODE=cli" in config["process"]["env"]
        assert coldbrew(runtime_root, "run", "--bundle", str(bundle), cid).stdout == "hello from the image\n"
    finally:
        if (bundle / "config.json").exists():
            cli("rm-bundle", str(bundle))
    assert not mounts_under(bundle) and not bundle.exists()


def test_cli_errors_are_one_line(session_store: Path, tmp_path: Path) -> None:
    (tmp_path / "bad.py").write_text("from coldbrew.imagebuild import Image\n"
                                     "relative = Image.debian_slim().workdir('app')\n")
    (tmp_path / "notimage.py").write_text("thing = 3\n")
    cases = [
        (["build", f"{tmp_path}/missing.py:x"], "missing.py: no such file"),
        (["build", f"{tmp_path}/bad.py:relative"], "workdir: path must be an absolute path"),
        (["build", f"{tmp_path}/notimage.py:thing"], "thing is a int, not an Image"),
        (["build", f"{tmp_path}/notimage.py:other"], "defines no 'other'"),
        (["bundle", "no-such-image", str(tmp_path / "b"), "--store", str(session_store)], "no image named"),
        (["bundle", "0" * 64, str(tmp_path / "b"), "--store", str(session_store)], "is not in the store"),
        (["rm-bundle", str(tmp_path)], "is not a bundle"),
    ]
    for args, expected in cases:
        result = cli(*args, check=False)
        assert result.returncode == 1, args
        assert expected in result.stderr and result.stderr.count("\n") == 1, result.stderr
        assert "Traceback" not in result.stderr
    assert not (tmp_path / "b").exists()


def test_from_oci_then_a_step(builder: Builder, rootfs: Path, tmp_path: Path, runtime_root: str, cid: str) -> None:
    if not shutil.which("umoci"):
        pytest.skip("umoci is not installed (scripts/setup installs it)")
    layout = tmp_path / "layout"
    unpacked = tmp_path / "unpacked"

    def umoci(*args: str) -> None:
        subprocess.run(["umoci", *args], check=True, capture_output=True)

    umoci("init", "--layout", str(layout))
    umoci("new", "--image", f"{layout}:busybox")
    umoci("unpack", "--image", f"{layout}:busybox", str(unpacked))
    shutil.rmtree(unpacked / "rootfs")
    shutil.copytree(rootfs, unpacked / "rootfs", symlinks=True)
    umoci("repack", "--image", f"{layout}:busybox", str(unpacked))
    umoci("config", "--image", f"{layout}:busybox", "--config.env", "FROM_OCI=1", "--config.workingdir", "/tmp",
          "--config.cmd", "sh")
    shutil.rmtree(unpacked)
    image = (Image.from_oci(str(layout), name="busybox")
             .run_commands("echo built > /built; echo $FROM_OCI > /from-env; pwd > /cwd"))
    result = builder.build(image)
    assert result.config.working_dir == "/tmp" and "FROM_OCI=1" in result.config.env
    output = run_bundle(builder.store, builder.cache, result.reference, tmp_path, runtime_root, cid,
                        "cat /built /from-env /cwd")
    assert output.split() == ["built", "1", "/tmp"]
    assert all(step.cached for step in builder.build(image).steps)

    # `coldbrew image import` is the same base step: a cache hit, recorded under a name made from the path
    imported = json.loads(cli("import", f"{layout}:busybox", "--store", str(builder.store), "--cache",
                              str(builder.cache), "--work-dir", str(builder.work), "--json").stdout)
    assert imported["reference"] == result.steps[0].reference and imported["steps"][0]["cached"]
    assert imported["name"] == "layout-busybox"
    assert "layout-busybox" in cli("ls", "--store", str(builder.store)).stdout


# --- definitions ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("make, expected", [
    (lambda: Image.debian_slim(python="2.7"), "python '2.7' is not a Debian release's python3"),
    (lambda: Image.debian_slim().apt_install("--allow-unauthenticated"), "is not a package"),
    (lambda: Image.debian_slim().apt_install("Bad Name"), "is not a package"),
    (lambda: Image.debian_slim().apt_install(), "packages is empty"),
    (lambda: Image.debian_slim().pip_install("six; rm -rf /"), "no options, no whitespace"),
    (lambda: Image.debian_slim().env({"1BAD": "x"}), "'1BAD' is not a variable name"),
    (lambda: Image.debian_slim().env({"A": 1}), "the value of A must be a string"),
    (lambda: Image.debian_slim().workdir("relative"), "must be an absolute path"),
    (lambda: Image.debian_slim().add_local_dir(".", "app"), "must be an absolute path"),
    (lambda: Image.debian_slim().run_commands(), "commands is empty"),
    (lambda: Image.debian_slim().cmd("sh"), None),
])
def test_definition_errors_name_the_argument(make, expected) -> None:
    if expected is None:
        assert make().steps[-1].definition() == {"kind": "cmd", "args": ["sh"]}
        return
    with pytest.raises(ImageDefinitionError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        make()


def test_images_are_immutable_and_keys_follow_definitions() -> None:
    base = Image.debian_slim()
    one = base.pip_install("six")
    two = base.pip_install("idna")
    assert len(base.steps) == 1 and len(one.steps) == 2 and one != two
    assert one == Image.debian_slim().pip_install("six")
    assert one.steps[1].definition() == {"kind": "pip_install", "packages": ["six"]}
    with pytest.raises(ImageDefinitionError, match="exactly one base"):
        Image(base.steps + Image.from_dir("/").steps)


RECORD_FIELDS = st.dictionaries(
    st.sampled_from(["reference", "config", "step", "parent", "entries", "file_bytes", "uploaded_bytes", "seconds",
                     "push_seconds", "built_at", "other"]),
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=70),
              st.just("a" * 64), st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
              st.lists(st.integers(), max_size=2)))


@settings(max_examples=300, deadline=None, database=None)
@given(st.one_of(st.binary(max_size=200), RECORD_FIELDS.map(lambda fields: json.dumps(fields).encode())))
def test_step_records_from_a_store_are_checked(data: bytes) -> None:
    """A damaged or hostile step record is an ImageBuildError naming it, or a record whose fields have their
    types; never another exception."""
    from coldbrew.imagebuild.cache import StepRecord

    try:
        record = StepRecord.from_bytes(data, "imagebuild-steps/x")
    except ImageBuildError as error:
        assert "imagebuild-steps/x" in str(error)
        return
    assert len(record.reference) == 64 and isinstance(record.config, dict)
    assert all(isinstance(getattr(record, name), (int, float)) for name in ("entries", "file_bytes", "seconds"))


@settings(max_examples=200, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(passwd=st.text(max_size=200), user=st.text(alphabet="abc0123:", max_size=8))
def test_image_users_resolve_or_fail_clearly(tmp_path_factory: pytest.TempPathFactory, passwd: str,
                                             user: str) -> None:
    from coldbrew.imagebuild.build import resolve_user

    root = tmp_path_factory.mktemp("users")
    (root / "etc").mkdir()
    (root / "etc" / "passwd").write_text(passwd)
    (root / "etc" / "group").write_text("root:x:0:\nstaff:x:50:\n")
    try:
        uid, gid = resolve_user(str(root), user)
    except ImageBuildError as error:
        assert "image user" in str(error)
        return
    assert uid >= 0 and gid >= 0
    if user.split(":")[0].isdigit():
        assert uid == int(user.split(":")[0])


def test_image_users_from_passwd(tmp_path: Path) -> None:
    from coldbrew.imagebuild.build import resolve_user

    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "passwd").write_text("root:x:0:0::/root:/bin/sh\napp:x:1000:1001::/home/app:/bin/sh\n")
    (tmp_path / "etc" / "group").write_text("root:x:0:\nstaff:x:50:\n")
    assert resolve_user(str(tmp_path), "") == (0, 0)
    assert resolve_user(str(tmp_path), "app") == (1000, 1001)
    assert resolve_user(str(tmp_path), "1000") == (1000, 1001)
    assert resolve_user(str(tmp_path), "app:staff") == (1000, 50)
    assert resolve_user(str(tmp_path), "77:78") == (77, 78)
    with pytest.raises(ImageBuildError, match="'nobody' is not in the image's /etc/passwd"):
        resolve_user(str(tmp_path), "nobody")


def test_image_user_tables_resolve_inside_the_image(tmp_path: Path) -> None:
    """An image's /etc/passwd that is a symlink to an absolute path names the image's file, never the host's."""
    from coldbrew.imagebuild.build import resolve_user

    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "users").write_text("app:x:4242:4343::/:/bin/sh\n")
    (tmp_path / "etc" / "passwd").symlink_to("/etc/users")  # on the host: no such file, or another one
    (tmp_path / "etc" / "group").symlink_to("/../../etc/users")
    assert resolve_user(str(tmp_path), "app") == (4242, 4343)
    with pytest.raises(ImageBuildError, match="'root' is not in the image's /etc/passwd"):
        resolve_user(str(tmp_path), "root")  # the host's /etc/passwd has root: it must not be read


# --- fs/layer.py: an index from the parent's and an overlay upper directory --------------------------------------

def _base_tree(path: Path) -> None:
    (path / "a" / "b").mkdir(parents=True)
    (path / "c").mkdir()
    (path / "a" / "f1").write_text("one")
    (path / "a" / "b" / "f2").write_bytes(os.urandom(300_000))
    (path / "c" / "f3").write_text("three")
    (path / "top").write_text("top")
    (path / "a" / "h1").write_text("hard")
    os.link(path / "a" / "h1", path / "a" / "h2")
    os.symlink("a/f1", path / "l")
    os.setxattr(path / "c" / "f3", "user.note", b"kept")


PATHS = ["top", "a", "a/f1", "a/b", "a/b/f2", "c", "c/f3", "l", "a/h1", "a/h2", "new", "new/x", "a/new", "c/sub",
         "c/sub/y"]
OPERATIONS = st.lists(st.tuples(
    st.sampled_from(["write", "append", "mkdir", "remove", "chmod", "symlink", "link", "xattr", "rename",
                     "rmdir-mkdir"]),
    st.sampled_from(PATHS), st.sampled_from(PATHS), st.binary(max_size=64), st.sampled_from([0o700, 0o755, 0o644])),
    max_size=12)


def _apply(merged: Path, operations) -> None:
    for kind, path, other, data, mode in operations:
        target, second = merged / path, merged / other
        try:
            if kind == "write":
                target.write_bytes(data)
            elif kind == "append":
                with open(target, "ab") as file:
                    file.write(data)
            elif kind == "mkdir":
                target.mkdir()
            elif kind == "remove":
                if target.is_dir() and not target.is_symlink():
                    shutil.rmtree(target)
                else:
                    target.unlink()
            elif kind == "chmod":
                os.chmod(target, mode, follow_symlinks=False) if not target.is_symlink() else None
            elif kind == "symlink":
                os.symlink(other, target)
            elif kind == "link":
                os.link(second, target, follow_symlinks=False)
            elif kind == "xattr":
                os.setxattr(target, "user.test", data or b"x", follow_symlinks=False)
            elif kind == "rename":
                os.rename(second, target)
            elif kind == "rmdir-mkdir":  # a directory replaced: overlayfs marks the new one opaque
                shutil.rmtree(target)
                target.mkdir()
                (target / "inside").write_bytes(data)
        except OSError:
            pass  # an operation that does not apply to the tree as it is now (or EXDEV for a lower directory)


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(operations=OPERATIONS)
def test_layer_push_equals_pushing_the_merged_tree(tmp_path_factory: pytest.TempPathFactory, operations) -> None:
    """Whatever a process does in an overlayfs root, the index made from the parent's index and the upper
    directory is the index of the merged tree, byte for byte."""
    base = tmp_path_factory.mktemp("layer")
    lower, upper, work, merged = (base / name for name in ("lower", "upper", "work", "merged"))
    for path in (lower, upper, work, merged):
        path.mkdir()
    _base_tree(lower)
    store = LocalStore(str(base / "store"))
    parent_reference = push(str(lower), store).reference
    assert mount_overlay(str(merged), str(lower), str(upper), str(work)) == 0
    try:
        _apply(merged, operations)
        expected = push(str(merged), store, metadata={"step": 2})
    finally:
        assert umount(str(merged)) == 0
    parent = load_index(store, parent_reference)
    try:
        layered = push_layer(parent, str(upper), store, metadata={"step": 2})
    finally:
        parent.release()
    assert layered.reference == expected.reference
    assert (layered.entries, layered.file_bytes, layered.chunks) == (expected.entries, expected.file_bytes,
                                                                      expected.chunks)
    shutil.rmtree(base)


def test_layer_push_reads_only_changed_files(tmp_path: Path) -> None:
    lower, upper = tmp_path / "lower", tmp_path / "upper"
    lower.mkdir()
    upper.mkdir()
    _base_tree(lower)
    store = LocalStore(str(tmp_path / "store"))
    parent = Index(_index_bytes(store, push(str(lower), store).reference))
    (upper / "c").mkdir()
    (upper / "c" / "new").write_bytes(b"n" * 5000)
    os.mknod(upper / "top", stat.S_IFCHR | 0o600, 0)  # a whiteout
    os.setxattr(upper / "c", "trusted.overlay.opaque", b"y")
    result = push_layer(parent, str(upper), store)
    index = Index(_index_bytes(store, result.reference))
    assert lookup_path(index, "/top") is None
    assert lookup_path(index, "/c/f3") is None, "an opaque directory hides the parent's entries"
    assert lookup_path(index, "/c/new") is not None and lookup_path(index, "/a/b/f2") is not None
    assert result.uploaded_chunks == 1  # only c/new's data is new
    assert b"trusted.overlay.opaque" not in index.xattrs(lookup_path(index, "/c"))
    os.setxattr(upper / "c", "trusted.overlay.redirect", b"/elsewhere")
    from coldbrew.fs.layer import LayerError

    with pytest.raises(LayerError, match="trusted.overlay.redirect"):
        push_layer(parent, str(upper), store)


def test_metadata_only_push_equals_an_empty_layer(tmp_path: Path) -> None:
    from coldbrew.fs.layer import push_metadata

    lower, upper = tmp_path / "lower", tmp_path / "upper"
    lower.mkdir()
    upper.mkdir()
    _base_tree(lower)
    store = LocalStore(str(tmp_path / "store"))
    reference = push(str(lower), store, metadata={"kept": True}).reference
    parent = Index(_index_bytes(store, reference))
    root = parent.attributes(1)
    os.chmod(upper, stat.S_IMODE(root.mode))
    os.utime(upper, ns=(root.mtime_ns, root.mtime_ns))
    layered = push_layer(parent, str(upper), store, metadata={"kept": True, "image_config": {"cmd": ["sh"]}})
    rewritten = push_metadata(reference, store, {"image_config": {"cmd": ["sh"]}})
    assert rewritten.reference == layered.reference != reference
    assert (rewritten.entries, rewritten.file_bytes, rewritten.chunks, rewritten.unique_chunks) == (
        layered.entries, layered.file_bytes, layered.chunks, layered.unique_chunks)
    assert Index(_index_bytes(store, rewritten.reference)).metadata["kept"] is True


def _index_bytes(store: LocalStore, reference: str) -> bytes:
    from coldbrew.fs import objects

    digest = bytes.fromhex(reference)
    return objects.decode(digest, store.get(digest), 1 << 30)


def test_bench_example_image_definition(tmp_path: Path) -> None:
    from coldbrew.bench.buildbench import example_image, local_torch_requirement

    assert local_torch_requirement(str(tmp_path)) is None
    (tmp_path / "torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl").write_bytes(b"")
    assert local_torch_requirement(str(tmp_path)) == "torch==2.13.0"
    image = example_image("/src", "torch==2.13.0")
    assert [step.kind for step in image.steps] == ["debian_slim", "apt_install", "pip_install", "env", "run_commands",
                                                    "add_local_dir", "workdir"]
    assert image.steps[2].param("packages") == ("numpy==2.1.*", "torch==2.13.0")
