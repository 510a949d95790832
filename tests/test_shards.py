import json

import numpy as np
import pytest
import torch

from nanoseek.data.shards import TokenLoader, load_manifest, prepare


def read_split(out, manifest, split):
    dtype = np.dtype(manifest["dtype"])
    return np.concatenate(
        [np.memmap(out / s["file"], dtype=dtype, mode="r") for s in manifest["splits"][split]["shards"]]
    )


def test_prepare_txt_and_jsonl_text_and_messages(tok, tmp_path):
    (tmp_path / "a.txt").write_text("First document.\nStill the first.")
    (tmp_path / "b.txt").write_text("Second document.")
    messages = [
        {"role": "user", "content": "What is 2+3?"},
        {"role": "assistant", "content": "<think></think> 5"},
    ]
    lines = [json.dumps({"text": "Third."}), "", json.dumps({"messages": messages})]
    (tmp_path / "c.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    m = prepare(tok, out, inputs=[tmp_path / "a.txt", tmp_path / "b.txt", tmp_path / "c.jsonl"], val_fraction=0)
    assert m["dtype"] == "uint16" and m["splits"]["train"]["documents"] == 4
    tokens = read_split(out, m, "train").tolist()
    expected = (
        tok.encode("First document.\nStill the first.", bos=True, eos=True)
        + tok.encode("Second document.", bos=True, eos=True)
        + tok.encode("Third.", bos=True, eos=True)
        + tok.encode_chat(messages)  # the template brings its own BOS and EOS
    )
    assert tokens == expected
    assert m["sources"] == {
        str(tmp_path / "a.txt"): 1,
        str(tmp_path / "b.txt"): 1,
        str(tmp_path / "c.jsonl"): 2,
    }


def test_builtin_manifest_counts_equal_shard_lengths(tok, builtin_data):
    m = load_manifest(builtin_data)
    assert m["tokenizer_hash"] == tok.hash() and m["vocab_size"] == tok.vocab_size
    for split in ("train", "val"):
        info = m["splits"][split]
        arr = read_split(builtin_data, m, split)
        assert arr.dtype == np.uint16 and len(arr) == info["tokens"] == sum(s["tokens"] for s in info["shards"])
        assert (arr == tok.bos_id).sum() == info["documents"] == (arr == tok.eos_id).sum()
    assert 0 < m["splits"]["val"]["documents"] < 0.2 * m["splits"]["train"]["documents"]


def test_shards_roll_over_and_dtype_follows_vocab(tok, tmp_path):
    m = prepare(tok, tmp_path / "d", builtin=["arithmetic"], n=200, shard_tokens=1000, val_fraction=0)
    shards = m["splits"]["train"]["shards"]
    assert len(shards) > 1 and all(s["tokens"] <= 1000 for s in shards)
    assert [s["file"] for s in shards[:2]] == ["train_000.bin", "train_001.bin"]
    assert sum(s["tokens"] for s in shards) == m["splits"]["train"]["tokens"]


def test_prepare_replaces_an_earlier_data_dir_but_not_other_dirs(tok, tmp_path):
    out = tmp_path / "d"
    prepare(tok, out, builtin=["arithmetic"], n=50)
    prepare(tok, out, builtin=["countdown"], n=50, worked_fraction=0.5)
    assert load_manifest(out)["sources"] == {"builtin": 50}
    assert load_manifest(out)["builtin"] == {"tasks": ["countdown"], "n": 50, "seed": 0, "worked_fraction": 0.5}
    other = tmp_path / "precious"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match="not a nanoseek data dir"):
        prepare(tok, other, builtin=["arithmetic"], n=10)
    assert (other / "keep.txt").exists() and not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_bad_jsonl_line_names_file_and_line(tok, tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"text": "ok"}\n{"text": 3}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: .*'text'"):
        prepare(tok, tmp_path / "out", inputs=[f])
    f.write_text('{"text": "ok"}\n\n{not json\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:3: invalid JSON"):
        prepare(tok, tmp_path / "out", inputs=[f])
    f.write_text('{"messages": [{"role": "wizard", "content": "hi"}]}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:1: bad messages"):
        prepare(tok, tmp_path / "out", inputs=[f])
    assert not (tmp_path / "out").exists()


def test_undecodable_file_names_file_line_and_fix(tok, tmp_path):
    f = tmp_path / "latin1.txt"
    f.write_bytes("line one\ncaf\u00e9\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.txt:2: not valid UTF-8.*re-encode"):
        prepare(tok, tmp_path / "out", inputs=[f])


def test_empty_and_missing_input_are_clear_errors(tok, tmp_path):
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(ValueError, match="empty.txt.*empty"):
        prepare(tok, tmp_path / "out", inputs=[tmp_path / "empty.txt"])
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        prepare(tok, tmp_path / "out", inputs=[tmp_path / "nope.txt"])
    with pytest.raises(FileNotFoundError, match="nanoseek prepare"):
        load_manifest(tmp_path)


def test_loader_targets_are_inputs_shifted_by_one(builtin_data):
    loader = TokenLoader(builtin_data, "train", batch_size=4, seq_len=32, seed=0)
    x, y = loader.next_batch()
    assert x.shape == y.shape == (4, 32) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    flat = torch.from_numpy(read_split(builtin_data, load_manifest(builtin_data), "train").astype(np.int64))
    row = x[0].tolist()
    starts = [i for i in range(len(flat) - 33) if flat[i : i + 32].tolist() == row]
    assert starts and flat[starts[0] + 32] == y[0, -1]  # the window really comes from the shard


def _window_keys(loader, n):
    return [tuple(row.tolist()) for _ in range(n) for row in loader.next_batch()[0]]


def test_ranks_see_disjoint_windows(builtin_data):
    r0 = TokenLoader(builtin_data, "train", batch_size=4, seq_len=32, rank=0, world_size=2, seed=1)
    r1 = TokenLoader(builtin_data, "train", batch_size=4, seq_len=32, rank=1, world_size=2, seed=1)
    n = r0.batches_per_epoch
    k0, k1 = _window_keys(r0, n), _window_keys(r1, n)
    assert len(set(k0)) == len(k0) and not set(k0) & set(k1)


def test_resume_from_state_dict_reproduces_next_batches(builtin_data):
    a = TokenLoader(builtin_data, "train", batch_size=2, seq_len=64, seed=3)
    steps = a.batches_per_epoch + 3  # cross an epoch boundary too
    for _ in range(steps - 5):
        a.next_batch()
    state = json.loads(json.dumps(a.state_dict()))  # survives a JSON round trip
    expected = [a.next_batch() for _ in range(5)]
    b = TokenLoader(builtin_data, "train", batch_size=2, seq_len=64, seed=3)
    b.load_state_dict(state)
    for (ex, ey), (x, y) in zip(expected, (b.next_batch() for _ in range(5))):
        assert torch.equal(ex, x) and torch.equal(ey, y)


def test_loader_errors_are_clear(builtin_data):
    with pytest.raises(ValueError, match="too few"):
        TokenLoader(builtin_data, "val", batch_size=10**5, seq_len=64)
    with pytest.raises(ValueError, match="no split"):
        TokenLoader(builtin_data, "dev", batch_size=1, seq_len=8)


def test_cli_prepare(tok_dir, tmp_path, capsys):
    from nanoseek.cli.main import main

    out = tmp_path / "data"
    argv = ["prepare", "--tokenizer", str(tok_dir), "--builtin", "arithmetic", "countdown", "--n", "100"]
    assert main(argv + ["--out", str(out)]) == 0
    assert load_manifest(out)["sources"] == {"builtin": 200}
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{}\n")
    assert main(["prepare", "--tokenizer", str(tok_dir), "--input", str(bad), "--out", str(out)]) == 1
    assert "bad.jsonl:1" in capsys.readouterr().err


def test_cli_prepare_builtin_spellings(tok_dir, tmp_path, capsys):
    from nanoseek.cli.main import main

    base = ["prepare", "--tokenizer", str(tok_dir), "--n", "20", "--val-fraction", "0"]
    assert main([*base, "--builtin", "--out", str(tmp_path / "all")]) == 0  # no names: every built-in task
    assert "deprecated" not in capsys.readouterr().err
    assert main([*base, "--builtin", "arithmetic,countdown", "--out", str(tmp_path / "old")]) == 0  # old spelling
    assert "comma-separated) is deprecated" in capsys.readouterr().err
    for name in ("all", "old"):
        assert load_manifest(tmp_path / name)["splits"] == load_manifest(tmp_path / "all")["splits"]
        assert load_manifest(tmp_path / name)["sources"] == {"builtin": 40}
    with pytest.raises(SystemExit):
        main([*base, "--builtin", "sudoku", "--out", str(tmp_path / "bad")])
    assert "unknown task(s) sudoku" in capsys.readouterr().err
