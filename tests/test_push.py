"""`repa push-to-hub` against a Hub on loopback: huggingface_hub's real upload path (create
repo, branch, preupload, NDJSON commit with base64 files) and download path (repo info, tree,
resolve), the token seen only in the Authorization header, and one-line errors."""

import base64
import hashlib
import json
import logging
import socket
import threading
import types
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

import numpy as np
import pytest
import typer
from helpers import tiny_recipe, velocities
from huggingface_hub import constants
from typer.testing import CliRunner

from repa_cli.push import push_to_hub
from repa_eqx.pretrained import PretrainedNotFound
from repa_eqx.runs.export import NotAnExport, from_pretrained
from repa_eqx.runs.load import load_run
from repa_eqx.training.recipe import dump_recipe

pytestmark = pytest.mark.standard_promotion

TOKEN = "hf_test_Zq8wN3vT5rYk2LmP9xC4"
app = typer.Typer()
app.callback()(lambda: None)  # keeps `push-to-hub` a subcommand
app.command("push-to-hub")(push_to_hub)
runner = CliRunner()


class FakeHub:
    """The few Hub endpoints huggingface_hub calls to push and to download, in memory."""

    def __init__(self):
        self.repos: dict[str, dict] = {}  # id -> {"private", "branches": {name: oid}}
        self.commits: dict[str, dict] = {}  # oid -> {"files": {path: bytes}, "message"}
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, auth header)

    def add_repo(self, repo_id, files, private=False):
        oid = self.commit(None, files, "initial commit")
        self.repos[repo_id] = {"private": private, "branches": {"main": oid}}

    def commit(self, parent, files, message):
        merged = {**(self.commits[parent]["files"] if parent else {}), **files}
        oid = hashlib.sha1(repr((parent, sorted(merged.items()), message)).encode()).hexdigest()
        self.commits[oid] = {"files": merged, "message": message}
        return oid

    def handle(self, method: str, path: str, auth: str | None, body: bytes):
        """(status, headers, body) for one request."""
        self.requests.append((method, path, auth))
        parts = [unquote(p) for p in path.strip("/").split("/")]
        writes = method == "POST" and path != "/api/validate-yaml"
        if writes and auth != f"Bearer {TOKEN}":
            return 401, {"X-Error-Message": "Invalid credentials in Authorization header"}, {}
        if path == "/api/repos/create":
            payload = json.loads(body)
            repo_id = f"{payload['organization']}/{payload['name']}"
            url = f"{self.url}/{repo_id}"
            if repo_id in self.repos:  # the Hub names the existing repository's url too
                return 409, {}, {"error": "You already created this model repo", "url": url}
            self.add_repo(repo_id, {}, private=payload.get("visibility") == "private")
            return 200, {}, {"url": url}
        if path == "/api/validate-yaml":
            return 200, {}, {"errors": [], "warnings": []}
        if parts[:2] == ["api", "models"] and len(parts) >= 6:
            repo_id, action, rev = f"{parts[2]}/{parts[3]}", parts[4], parts[5]
        elif len(parts) >= 5 and parts[2] == "resolve":
            repo_id, action, rev = f"{parts[0]}/{parts[1]}", "resolve", parts[3]
        else:
            return 404, {}, {"error": "no such endpoint"}
        repo = self.repos.get(repo_id)
        if repo is None:
            return 404, {"X-Error-Code": "RepoNotFound"}, {"error": "Repository not found"}
        if action == "branch":
            if rev in repo["branches"]:
                return 409, {}, {"error": "Branch already exists"}
            repo["branches"][rev] = repo["branches"]["main"]
            return 200, {}, {}
        oid = repo["branches"].get(rev, rev if rev in self.commits else None)
        if oid is None:
            return 404, {"X-Error-Code": "RevisionNotFound"}, {"error": "Invalid rev id"}
        files = self.commits[oid]["files"]
        if action == "preupload":
            names = [f["path"] for f in json.loads(body)["files"]]
            modes = [{"path": n, "uploadMode": "regular", "shouldIgnore": False} for n in names]
            return 200, {}, {"files": modes}
        if action == "commit":
            lines = [json.loads(line) for line in body.splitlines()]
            assert lines[0]["key"] == "header"
            added = {}
            for line in lines[1:]:
                assert line["key"] == "file" and line["value"]["encoding"] == "base64", line
                added[line["value"]["path"]] = base64.b64decode(line["value"]["content"])
            new = self.commit(oid, added, lines[0]["value"]["summary"])
            repo["branches"][rev] = new
            return 200, {}, {"commitUrl": f"{self.url}/{repo_id}/commit/{new}", "commitOid": new}
        if action == "revision":
            siblings = [{"rfilename": name} for name in sorted(files)]
            return 200, {}, {"id": repo_id, "sha": oid, "private": False, "siblings": siblings}
        if action == "tree":
            tree = [
                {"type": "file", "path": n, "size": len(b), "oid": hashlib.sha1(b).hexdigest()}
                for n, b in sorted(files.items())
            ]
            return 200, {}, tree
        name = "/".join(parts[4:])  # resolve
        if name not in files:
            return 404, {"X-Error-Code": "EntryNotFound"}, {"error": "Entry not found"}
        data = files[name]
        etag = f'"{hashlib.sha1(data).hexdigest()}"'
        return 200, {"X-Repo-Commit": oid, "ETag": etag}, data


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """A FakeHub served on loopback, huggingface_hub pointed at it with the fake token, and a
    private Hub cache and token file."""
    fake = FakeHub()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def answer(self, method):
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            url = urlsplit(self.path)
            status, headers, content = fake.handle(
                method, url.path, self.headers.get("Authorization"), body
            )
            data = content if isinstance(content, bytes) else json.dumps(content).encode()
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if method != "HEAD":
                self.wfile.write(data)

        def do_GET(self):
            self.answer("GET")

        def do_HEAD(self):
            self.answer("HEAD")

        def do_POST(self):
            self.answer("POST")

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    fake.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    # huggingface_hub reads these at import: patch the constants, and the env for completeness.
    monkeypatch.setenv("HF_ENDPOINT", fake.url)
    monkeypatch.setattr(constants, "ENDPOINT", fake.url)
    template = fake.url + "/{repo_id}/resolve/{revision}/{filename}"
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf_home" / "token"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf_home" / "hub"))
    monkeypatch.setattr(constants, "AGENT_HARNESSES_PATH", str(tmp_path / "hf_home" / "agents"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    yield fake
    server.shutdown()
    server.server_close()


@pytest.fixture
def hf_log():
    """Every record huggingface_hub logs, at debug level (with its curl-style request dumps)."""
    records: list[str] = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = lambda record: records.append(record.getMessage())
    logger = logging.getLogger("huggingface_hub")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield records
    logger.removeHandler(handler)
    logger.setLevel(level)


def one_line_error(result, message):
    assert result.exit_code == 1, result.output
    assert message in result.output, result.output
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit)
    assert len(result.output.strip().splitlines()) == 1, result.output


def test_push_uploads_the_export_in_one_commit(trained_run, hub, hf_log, tmp_path, monkeypatch):
    monkeypatch.setattr(constants, "HF_DEBUG", True)  # also log each request as a curl line
    out = tmp_path / "export"
    args = ["push-to-hub", "me/tiny-repa", "--run", str(trained_run), "--out", str(out)]
    result = runner.invoke(app, [*args, "--private", "--message", "First tiny model"])
    assert result.exit_code == 0, result.output
    repo = hub.repos["me/tiny-repa"]
    assert repo["private"]
    assert result.output.startswith(f"uploaded {out} to me/tiny-repa (main):")
    commits = [m for m, p, _ in hub.requests if p.startswith("/api/models/me/tiny-repa/commit")]
    assert commits == ["POST"]
    head = hub.commits[repo["branches"]["main"]]
    assert head["message"] == "First tiny model"
    names = ["config.json", "README.md", "samples.png", "model.safetensors"]
    assert sorted(head["files"]) == sorted(names)
    for name in names:
        assert head["files"][name] == (out / name).read_bytes(), name
        assert f"  {name}  " in result.output
    assert "repa sample --from-hub me/tiny-repa" in head["files"]["README.md"].decode()
    assert f"{hub.url}/me/tiny-repa/commit/{repo['branches']['main']}" in result.output

    # The token went out in the Authorization header and nowhere else.
    # (huggingface_hub also fetches its public agent registry, without a token.)
    assert {auth for _, _, auth in hub.requests if auth} == {f"Bearer {TOKEN}"}
    assert all(auth for method, _, auth in hub.requests if method == "POST")
    assert hf_log and TOKEN not in "\n".join(hf_log)
    assert any("<TOKEN>" in line for line in hf_log)  # the curl dumps mask it
    assert TOKEN not in result.output
    for file in [*tmp_path.rglob("*"), *trained_run.rglob("*")]:
        if file.is_file():
            assert TOKEN.encode() not in file.read_bytes(), file

    # A second push on a new branch, with the train state: the repository already exists.
    result = runner.invoke(app, [*args, "--revision", "exp1", "--include-train-state"])
    assert result.exit_code == 0, result.output
    assert set(repo["branches"]) == {"main", "exp1"}
    branch = hub.commits[repo["branches"]["exp1"]]
    assert "train_state.safetensors" in branch["files"]
    assert branch["message"] == "Upload tiny at step 4 (repa-eqx)"
    assert "--revision exp1" in branch["files"]["README.md"].decode()
    assert "train_state.safetensors" not in hub.commits[repo["branches"]["main"]]["files"]


def test_pushed_model_loads_back_from_the_hub_then_offline(trained_run, hub, tmp_path, monkeypatch):
    from repa_eqx.runs.push import push_run

    result = push_run(trained_run, "me/tiny-repa", out_dir=tmp_path / "export")
    assert result.commit_url.startswith(hub.url)
    reference = velocities(load_run(trained_run).sit)
    model = from_pretrained("me/tiny-repa", endpoint=hub.url)
    assert model.step == 4 and str(model.source).startswith(constants.HF_HUB_CACHE)
    np.testing.assert_array_equal(velocities(model.sit), reference)
    served = {p for m, p, _ in hub.requests if m == "GET" and "/resolve/" in p}
    assert {p.rsplit("/", 1)[1] for p in served} == {"config.json", "model.safetensors"}

    with pytest.raises(PretrainedNotFound, match="the Hub has no repository 'me/missing'"):
        from_pretrained("me/missing", endpoint=hub.url)
    hub.add_repo("me/official", {"README.md": b"# not ours", "last.pt": b"\0" * 8})
    with pytest.raises(NotAnExport, match="is not a repa-eqx export"):
        from_pretrained("me/official", endpoint=hub.url)

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    seen = len(hub.requests)
    offline = from_pretrained("me/tiny-repa")
    assert len(hub.requests) == seen and offline.source == model.source
    np.testing.assert_array_equal(velocities(offline.sit), reference)


def test_dry_run_lists_the_export_and_touches_no_network(trained_run, hub, tmp_path):
    out = tmp_path / "export"
    result = runner.invoke(
        app, ["push-to-hub", "--run", str(trained_run), "--out", str(out), "--dry-run"]
    )
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert lines[0] == f"would upload {out} to OWNER/NAME (main):"
    sizes = {name: (out / name).stat().st_size for name in ("config.json", "model.safetensors")}
    assert f"  model.safetensors  {sizes['model.safetensors'] / 1000:.1f} kB" in lines
    assert f"  config.json  {sizes['config.json'] / 1000:.1f} kB" in lines
    assert len(lines) == 5  # config, card, grid, weights
    assert hub.requests == []


def test_bare_push_takes_the_latest_run_and_the_recipes_repository(trained_run, hub, monkeypatch):
    import repa_eqx.runs.push

    recipe = types.SimpleNamespace(output=types.SimpleNamespace(hub_repo="me/from-recipe"))
    monkeypatch.setattr(repa_eqx.runs.push, "load_recipe", lambda path: recipe)
    monkeypatch.chdir(trained_run.parent.parent)
    result = runner.invoke(app, ["push-to-hub", "--runs-dir", str(trained_run.parent)])
    assert result.exit_code == 0, result.output
    assert f"uploaded {trained_run / 'export'} to me/from-recipe (main):" in result.output
    assert (
        "model.safetensors" in hub.commits[hub.repos["me/from-recipe"]["branches"]["main"]]["files"]
    )


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_errors_are_one_line_and_keep_the_export(trained_run, hub, tmp_path, monkeypatch):

    out = tmp_path / "export"
    push = ["push-to-hub", "me/tiny-repa", "--out", str(out)]

    result = runner.invoke(app, [*push, "--run", str(tmp_path / "nowhere")])
    one_line_error(result, "nowhere is not a run directory")
    assert not out.exists()

    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / "recipe.toml").write_text(dump_recipe(tiny_recipe(fresh)))
    result = runner.invoke(app, [*push, "--run", str(fresh)])
    one_line_error(result, "has no checkpoint yet")
    assert not out.exists()

    result = runner.invoke(app, ["push-to-hub", "--run", str(trained_run), "--out", str(out)])
    one_line_error(result, "no Hub repository to push to")
    result = runner.invoke(app, ["push-to-hub", "not a repo", "--run", str(trained_run)])
    one_line_error(result, "is not a Hub repository id")

    # No token anywhere: HF_TOKEN unset and an empty HF_HOME (huggingface_hub read the token
    # file's path at import: the hub fixture points that at an empty folder too).
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty_home"))
    result = runner.invoke(app, [*push, "--run", str(trained_run)])
    one_line_error(
        result,
        f"no Hugging Face token: set HF_TOKEN or run `hf auth login` (the export is in {out})",
    )
    assert (out / "model.safetensors").is_file()
    assert not any(m == "POST" for m, _, _ in hub.requests)

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    nowhere = f"http://127.0.0.1:{closed_port()}"
    monkeypatch.setattr(constants, "ENDPOINT", nowhere)
    result = runner.invoke(app, [*push, "--run", str(trained_run)])
    one_line_error(result, f"cannot reach the Hub at {nowhere}")
    assert f"(the export is in {out})" in result.output and TOKEN not in result.output
    assert (out / "model.safetensors").is_file() and (out / "README.md").is_file()

    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    result = runner.invoke(app, [*push, "--run", str(trained_run)])
    one_line_error(result, "HF_HUB_OFFLINE is set: unset it to push")

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", "hf_test_wrong")
    result = runner.invoke(app, [*push, "--run", str(trained_run)])
    one_line_error(result, "the Hub rejected the token (401)")
    assert (out / "model.safetensors").is_file()
