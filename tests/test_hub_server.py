"""The local Hub test double, driven by the real huggingface_hub / transformers / datasets clients."""

import hashlib
import os

import numpy as np
import pytest
import torch
from huggingface_hub import HfApi, hf_hub_download
from huggingface_hub.errors import HfHubHTTPError, RevisionNotFoundError
from safetensors.torch import load_file, save_file


def _api(hub_server) -> HfApi:
    return HfApi(endpoint=hub_server.endpoint, token=hub_server.token)


@pytest.fixture
def weights_file(tmp_path):
    """A small binary safetensors file (goes through the LFS upload path)."""
    torch.manual_seed(0)
    path = tmp_path / "weights.safetensors"
    save_file({"embedding": torch.randn(16, 8)}, str(path))
    return path


def test_server_binds_loopback_and_whoami_needs_token(hub_server):
    assert hub_server.endpoint.startswith("http://127.0.0.1:")
    assert HfApi(endpoint=hub_server.endpoint).whoami(token=hub_server.token)["name"] == hub_server.user
    with pytest.raises(HfHubHTTPError) as excinfo:
        HfApi(endpoint=hub_server.endpoint).whoami(token="hf_wrong")
    assert excinfo.value.response.status_code == 401


def test_upload_and_download_by_branch_and_sha(hub_server, weights_file, tmp_path):
    api = _api(hub_server)
    repo_url = api.create_repo("test-user/files-roundtrip")
    assert repo_url.repo_id == "test-user/files-roundtrip"
    assert api.create_repo("test-user/files-roundtrip", exist_ok=True).repo_id == repo_url.repo_id

    first = api.upload_file(path_or_fileobj=b"hello hub\n", path_in_repo="notes/hello.txt",
                            repo_id=repo_url.repo_id)
    second = api.upload_file(path_or_fileobj=str(weights_file), path_in_repo="model.safetensors",
                             repo_id=repo_url.repo_id)
    assert len(first.oid) == 40 and len(second.oid) == 40 and first.oid != second.oid

    info = api.model_info(repo_url.repo_id)
    assert info.sha == second.oid
    siblings = {s.rfilename: s for s in info.siblings}
    assert set(siblings) == {".gitattributes", "notes/hello.txt", "model.safetensors"}
    expected_sha256 = hashlib.sha256(weights_file.read_bytes()).hexdigest()
    assert siblings["model.safetensors"].lfs.sha256 == expected_sha256  # went through LFS
    assert siblings["notes/hello.txt"].lfs is None  # small text file: regular git blob

    by_branch = hf_hub_download(repo_url.repo_id, "model.safetensors", cache_dir=tmp_path / "cache")
    torch.testing.assert_close(load_file(by_branch)["embedding"], load_file(str(weights_file))["embedding"])
    # The first commit predates the weights: by sha the text exists, the weights do not.
    old_text = hf_hub_download(repo_url.repo_id, "notes/hello.txt", revision=first.oid, cache_dir=tmp_path / "c2")
    assert open(old_text, "rb").read() == b"hello hub\n"
    with pytest.raises(HfHubHTTPError) as excinfo:
        hf_hub_download(repo_url.repo_id, "model.safetensors", revision=first.oid, cache_dir=tmp_path / "c3")
    assert excinfo.value.response.status_code == 404

    # Uploading an unchanged file makes no new commit (the preupload oid tells the client).
    api.upload_file(path_or_fileobj=str(weights_file), path_in_repo="model.safetensors", repo_id=repo_url.repo_id)
    assert api.model_info(repo_url.repo_id).sha == second.oid


def test_upload_folder_listing_and_tree(hub_server, weights_file, tmp_path):
    api = _api(hub_server)
    repo_id = api.create_repo("test-user/folder-listing", repo_type="dataset").repo_id
    folder = tmp_path / "folder"
    (folder / "sub" / "deeper").mkdir(parents=True)
    (folder / "README.md").write_text("# a card\n")
    (folder / "sub" / "deeper" / "w.safetensors").write_bytes(weights_file.read_bytes())
    api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="dataset")

    files = api.list_repo_files(repo_id, repo_type="dataset")
    assert sorted(files) == [".gitattributes", "README.md", "sub/deeper/w.safetensors"]
    top = {entry.path: type(entry).__name__ for entry in api.list_repo_tree(repo_id, repo_type="dataset")}
    assert top == {".gitattributes": "RepoFile", "README.md": "RepoFile", "sub": "RepoFolder"}
    nested = [e.path for e in api.list_repo_tree(repo_id, "sub", recursive=True, repo_type="dataset")]
    assert nested == ["sub/deeper", "sub/deeper/w.safetensors"]
    expanded = list(api.list_repo_tree(repo_id, "sub/deeper", expand=True, repo_type="dataset"))
    assert expanded[0].last_commit.oid == api.dataset_info(repo_id).sha
    with pytest.raises(HfHubHTTPError) as excinfo:
        list(api.list_repo_tree(repo_id, "no-such-folder", repo_type="dataset"))
    assert excinfo.value.response.headers["X-Error-Code"] == "EntryNotFound"
    info = api.get_paths_info(repo_id, ["README.md", "sub", "missing.txt"], repo_type="dataset")
    assert [(type(i).__name__, i.path) for i in info] == [("RepoFile", "README.md"), ("RepoFolder", "sub")]

    # HfFileSystem reads byte ranges (HTTP Range) of the resolved file.
    from huggingface_hub import HfFileSystem

    fs = HfFileSystem(endpoint=hub_server.endpoint, token=hub_server.token)
    with fs.open(f"datasets/{repo_id}/sub/deeper/w.safetensors", "rb", block_size=8) as remote:
        remote.seek(5)
        assert remote.read(11) == weights_file.read_bytes()[5:16]
    assert fs.read_text(f"datasets/{repo_id}/README.md") == "# a card\n"

    api.delete_file("README.md", repo_id=repo_id, repo_type="dataset")
    assert "README.md" not in api.list_repo_files(repo_id, repo_type="dataset")
    assert len(api.list_repo_commits(repo_id, repo_type="dataset")) == 3  # initial, upload, delete


def test_branch_push_is_isolated_from_main(hub_server, tmp_path):
    api = _api(hub_server)
    repo_id = api.create_repo("test-user/branching").repo_id
    api.upload_file(path_or_fileobj=b"v1", path_in_repo="version.txt", repo_id=repo_id)
    api.create_branch(repo_id, branch="dev")
    api.upload_file(path_or_fileobj=b"v2", path_in_repo="version.txt", repo_id=repo_id, revision="dev")

    refs = {ref.name: ref.target_commit for ref in api.list_repo_refs(repo_id).branches}
    assert set(refs) == {"main", "dev"} and refs["main"] != refs["dev"]
    read = lambda rev: open(hf_hub_download(repo_id, "version.txt", revision=rev,  # noqa: E731
                                            cache_dir=tmp_path / rev), "rb").read()
    assert read("main") == b"v1" and read("dev") == b"v2" and read(refs["dev"]) == b"v2"
    with pytest.raises(HfHubHTTPError) as excinfo:
        api.create_branch(repo_id, branch="dev")
    assert excinfo.value.response.status_code == 409


def test_missing_revision_and_missing_repo(hub_server, tmp_path):
    api = _api(hub_server)
    repo_id = api.create_repo("test-user/revisions").repo_id
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(repo_id, ".gitattributes", revision="no-such-branch", cache_dir=tmp_path)
    with pytest.raises(RevisionNotFoundError):
        api.model_info(repo_id, revision="0" * 40)
    from huggingface_hub.errors import RepositoryNotFoundError

    with pytest.raises(RepositoryNotFoundError):
        api.model_info("test-user/never-created")
    with pytest.raises(Exception, match="Repo id must"):
        api.create_repo("bad//id")  # rejected by the client before any request


def test_stale_parent_commit_is_refused(hub_server):
    from huggingface_hub import CommitOperationAdd

    api = _api(hub_server)
    repo_id = api.create_repo("test-user/concurrency").repo_id
    stale = api.model_info(repo_id).sha
    api.upload_file(path_or_fileobj=b"first", path_in_repo="a.txt", repo_id=repo_id)
    with pytest.raises(HfHubHTTPError) as excinfo:
        api.create_commit(repo_id, operations=[CommitOperationAdd("b.txt", b"second")],
                          commit_message="racing", parent_commit=stale)
    assert excinfo.value.response.status_code == 412  # datasets' push_to_hub retries on exactly this


def test_private_repo_hidden_without_token(hub_server, monkeypatch):
    from huggingface_hub.errors import RepositoryNotFoundError

    repo_id = _api(hub_server).create_repo("test-user/private-one", private=True).repo_id
    assert _api(hub_server).model_info(repo_id).private is True
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(RepositoryNotFoundError):
        HfApi(endpoint=hub_server.endpoint).model_info(repo_id)


def test_push_without_token_fails_with_401(hub_server, monkeypatch):
    repo_id = _api(hub_server).create_repo("test-user/auth").repo_id
    monkeypatch.delenv("HF_TOKEN")
    anonymous = HfApi(endpoint=hub_server.endpoint)
    with pytest.raises(HfHubHTTPError) as excinfo:
        anonymous.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=repo_id)
    assert excinfo.value.response.status_code == 401
    assert "Authorization: Bearer" in str(excinfo.value)
    with pytest.raises(HfHubHTTPError) as excinfo:
        anonymous.create_repo("test-user/auth-2")
    assert excinfo.value.response.status_code == 401
    assert anonymous.list_repo_files(repo_id) == [".gitattributes"]  # public reads need no token


def test_transformers_push_to_hub_and_from_pretrained(hub_server, tmp_path):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                        vocab_size=99, max_position_embeddings=64)
    model = BertModel(config).eval()
    model.push_to_hub("test-user/tiny-bert")
    assert "model.safetensors" in _api(hub_server).list_repo_files("test-user/tiny-bert")

    loaded = BertModel.from_pretrained("test-user/tiny-bert", cache_dir=tmp_path).eval()
    original_state, loaded_state = model.state_dict(), loaded.state_dict()
    assert original_state.keys() == loaded_state.keys()
    for name, tensor in original_state.items():
        torch.testing.assert_close(loaded_state[name], tensor, rtol=0, atol=0, msg=name)


def test_datasets_push_to_hub_and_load_dataset(hub_server):
    import datasets

    rng = np.random.default_rng(0)
    table = datasets.Dataset.from_dict({
        "user_id": [f"u{i}" for i in range(20)],
        "item_id": [f"i{int(j)}" for j in rng.integers(0, 50, size=20)],
        "label": rng.integers(0, 2, size=20).tolist(),
    })
    table.push_to_hub("test-user/tiny-interactions")
    files = _api(hub_server).list_repo_files("test-user/tiny-interactions", repo_type="dataset")
    assert "README.md" in files and any(f.startswith("data/train-") and f.endswith(".parquet") for f in files)

    loaded = datasets.load_dataset("test-user/tiny-interactions", split="train",
                                   cache_dir=os.path.join(os.environ["HF_HOME"], "datasets-test"))
    assert loaded.features == table.features
    assert loaded.to_dict() == table.to_dict()


def test_malformed_requests_get_an_answer_not_a_hang(hub_server):
    import http.client
    from urllib.parse import urlsplit

    repo_id = _api(hub_server).create_repo("test-user/malformed").repo_id
    host, port = urlsplit(hub_server.endpoint).hostname, urlsplit(hub_server.endpoint).port
    conn = http.client.HTTPConnection(host, port, timeout=10)
    conn.request("POST", f"/api/models/{repo_id}/commit/main", body=b"zz\r\n",  # bad chunk size
                 headers={"Transfer-Encoding": "chunked", "Authorization": f"Bearer {hub_server.token}"})
    response = conn.getresponse()
    assert response.status == 500 and b"ValueError" in response.read()
    conn.close()
    conn = http.client.HTTPConnection(host, port, timeout=10)
    conn.request("GET", "/api/no/such/route")
    response = conn.getresponse()
    assert response.status == 404 and b"no route" in response.read()
    conn.close()
    assert _api(hub_server).whoami()["name"] == hub_server.user  # still serving
