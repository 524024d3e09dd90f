import json

import pytest

from neighbor_grpo.config.train_config import ConfigError, load_config
from neighbor_grpo.config.prompts import read_prompt_file, resolve_prompt_sets, split_prompts

PROMPTS = ["a red cube", 'a sign that says "HELLO"', "a cat, sitting", "two dogs"]


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_text_file_one_prompt_per_line_skips_blank_lines(tmp_path):
    path = write(tmp_path / "p.txt", "\n".join(PROMPTS[:2]) + "\n\n  \n" + "\n".join(PROMPTS[2:]) + "\n")
    assert read_prompt_file(path) == PROMPTS


def test_jsonl_takes_strings_or_the_named_field(tmp_path):
    lines = [json.dumps({"prompt": PROMPTS[0], "tag": 1}), json.dumps(PROMPTS[1]), "",
             json.dumps({"prompt": PROMPTS[2]}), json.dumps({"prompt": PROMPTS[3]})]
    assert read_prompt_file(write(tmp_path / "p.jsonl", "\n".join(lines))) == PROMPTS
    other = write(tmp_path / "q.jsonl", "\n".join(json.dumps({"caption": p}) for p in PROMPTS))
    assert read_prompt_file(other, field="caption") == PROMPTS


def test_csv_reads_the_prompt_column_with_quoted_commas(tmp_path):
    rows = ["id,prompt,score"] + [f'{i},"{p.replace(chr(34), chr(34) * 2)}",0.5' for i, p in enumerate(PROMPTS)]
    assert read_prompt_file(write(tmp_path / "p.csv", "\n".join(rows) + "\n")) == PROMPTS
    single = write(tmp_path / "single.csv", "text\n" + "\n".join(f'"{p.replace(chr(34), chr(34) * 2)}"' for p in PROMPTS))
    assert read_prompt_file(single) == PROMPTS  # one column: taken whatever its name
    tsv = write(tmp_path / "p.tsv", "caption\tx\n" + "\n".join(f"{p}\t1" for p in PROMPTS))
    assert read_prompt_file(tsv, field="caption") == PROMPTS


@pytest.mark.parametrize("name, text, message", [
    ("p.jsonl", '{"prompt": "ok"}\n{broken\n', "line 2: not valid JSON"),
    ("p.jsonl", '{"caption": "x"}\n', "line 1: expected a string field 'prompt'"),
    ("p.jsonl", "[1, 2]\n", "line 1: expected a string or an object"),
    ("p.csv", "id,caption\n1,x\n", "no column 'prompt'"),
    ("p.txt", "\n\n", "holds no prompts"),
    ("p.yaml", "- a\n", "unknown format '.yaml'"),
])
def test_bad_files_name_the_file_and_the_problem(tmp_path, name, text, message):
    path = write(tmp_path / name, text)
    with pytest.raises(ValueError, match=message) as error:
        read_prompt_file(path, where="prompts.file")
    assert str(path) in str(error.value) and "prompts.file" in str(error.value)


def test_missing_and_non_utf8_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="prompts.eval_file .*nope.txt.*no such file"):
        read_prompt_file(tmp_path / "nope.txt", where="prompts.eval_file")
    (tmp_path / "latin.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match="not UTF-8"):
        read_prompt_file(tmp_path / "latin.txt")


def test_split_is_fixed_disjoint_and_keeps_duplicates_on_one_side():
    prompts = [f"prompt {i}" for i in range(50)] + ["prompt 3", "prompt 3"]
    train, held_out = split_prompts(prompts, 0.2, seed=7)
    assert (train, held_out) == split_prompts(prompts, 0.2, seed=7)
    assert len(held_out) == 10 and len(set(held_out)) == 10
    assert not set(train) & set(held_out)
    assert set(train) | set(held_out) == set(prompts)
    assert split_prompts(prompts, 0.2, seed=8)[1] != held_out
    assert sum(p == "prompt 3" for p in train) in (0, 3)  # all three copies land on the same side


def test_split_refuses_fractions_that_leave_nothing_to_train():
    with pytest.raises(ValueError, match="leaves no training prompt"):
        split_prompts(["a", "b"], 0.9)
    assert split_prompts(["a", "b", "c"], 0.01)[1].__len__() == 1  # a positive fraction holds out at least one


def test_config_resolves_file_split_eval_file_and_limit(tmp_path):
    write(tmp_path / "train.jsonl", "\n".join(json.dumps({"prompt": f"p{i}"}) for i in range(20)))
    write(tmp_path / "eval.csv", "prompt\n" + "\n".join(f"e{i}" for i in range(5)))
    config = load_config(None, [f"prompts.file={tmp_path / 'train.jsonl'}", "prompts.eval_fraction=0.25"])
    train, held_out = resolve_prompt_sets(config.prompts)
    assert len(train) == 15 and len(held_out) == 5 and not set(train) & set(held_out)
    config = load_config(None, [f"prompts.file={tmp_path / 'train.jsonl'}", f"prompts.eval_file={tmp_path / 'eval.csv'}",
                                "prompts.eval_limit=3"])
    train, held_out = resolve_prompt_sets(config.prompts)
    assert len(train) == 20 and held_out == ["e0", "e1", "e2"]
    default_train, default_eval = resolve_prompt_sets(load_config(None, []).prompts)
    assert default_train == default_eval == [str(d) for d in range(10)]


@pytest.mark.parametrize("override, key", [
    ("prompts.eval_fraction=0.3", "prompts.eval_fraction"),  # no file to split
    ("prompts.eval_limit=0", "prompts.eval_limit"),
])
def test_config_refuses_inconsistent_prompt_settings(override, key):
    with pytest.raises(ConfigError, match=key):
        load_config(None, [override])


def write_image(path, colour, size=(8, 6)):
    from PIL import Image

    Image.new("RGB", size, colour).save(path)
    return path


def test_jsonl_rows_with_an_image_are_edit_prompts_that_carry_their_source(tmp_path):
    import pickle

    import torch

    from neighbor_grpo.config.prompts import EditPrompt, load_source_images

    (tmp_path / "images").mkdir()
    write_image(tmp_path / "images" / "red.png", (255, 0, 0))
    write_image(tmp_path / "images" / "blue.png", (0, 0, 255), size=(4, 4))
    path = tmp_path / "edits.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in [
        {"prompt": "make it green", "image": "images/red.png"},
        {"prompt": "make it green", "image": str(tmp_path / "images" / "blue.png")},  # absolute paths work too
        {"prompt": "add a hat", "image": "images/red.png"}]))
    prompts = read_prompt_file(path)
    assert [str(p) for p in prompts] == ["make it green", "make it green", "add a hat"]
    assert all(isinstance(p, EditPrompt) for p in prompts)
    assert prompts[0].image == str((tmp_path / "images" / "red.png").resolve())
    # the same instruction on two images is two prompts (a cache or a split keyed by prompts keeps them apart)
    assert prompts[0] != prompts[1] and len(set(prompts)) == 3 and prompts[0] != "make it green"
    assert pickle.loads(pickle.dumps(prompts[1])) == prompts[1]  # crosses process boundaries intact
    assert json.dumps(prompts[0]) == '"make it green"'  # logs write the text
    train, held_out = split_prompts(prompts, 0.34, seed=0)
    assert len(train) == 2 and len(held_out) == 1 and set(train).isdisjoint(held_out)
    sources = load_source_images(prompts, 6, 8)
    assert sources.shape == (3, 3, 6, 8) and sources.dtype == torch.float32
    assert torch.equal(sources[0, 0], torch.ones(6, 8)) and torch.equal(sources[0, 2], torch.zeros(6, 8))
    assert torch.allclose(sources[1, 2], torch.ones(6, 8)) and sources[1, 0].max() < 1e-6  # resized blue
    assert load_source_images(["a plain prompt"], 6, 8) is None


@pytest.mark.parametrize("rows, message", [
    ([{"prompt": "a", "image": "missing.png"}], r"line 1: source image '.*missing.png': no such file"),
    ([{"prompt": "a", "image": 3}], r"line 1: expected `image` to be a path"),
    ([{"prompt": "a", "image": "ok.png"}, {"prompt": "b"}], "some rows give an `image` and some do not"),
])
def test_bad_editing_rows_name_the_file_line_and_field(tmp_path, rows, message):
    write_image(tmp_path / "ok.png", (1, 2, 3))
    path = tmp_path / "edits.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in rows))
    with pytest.raises((ValueError, FileNotFoundError), match=message) as info:
        read_prompt_file(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)
