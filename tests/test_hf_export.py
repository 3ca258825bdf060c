"""Compressed folders that ``AutoModelForCausalLM`` loads (remote code), and lm-evaluation-harness on an offline task."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from gradlore.cli import main as cli_main
from gradlore.compress.remote import MODEL_TYPE
from gradlore.compress.welore import compress, load_compressed, save_compressed
from gradlore.data.corpora import resolve_corpus
from gradlore.data.tokenizer import train_bpe

VOCAB = 320


def tiny(family: str, tied: bool):
    torch.manual_seed(0)
    if family == "gpt2":
        return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                          bos_token_id=0, eos_token_id=0)).eval()
    if family == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=tied,
                                            max_position_embeddings=64)).eval()
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied,
                                        max_position_embeddings=64)).eval()


@pytest.mark.parametrize("family,tied,embeddings", [("llama", True, False), ("llama", False, True),
                                                    ("qwen2", True, True), ("gpt2", True, False)])
def test_compressed_folder_loads_with_auto_model_and_gives_identical_logits(tmp_path, family, tied, embeddings):
    model = tiny(family, tied)
    compress(model, remove=0.4, include_embeddings=embeddings, cache_dir=tmp_path / "cache")
    out = save_compressed(model, tmp_path / f"{family}-{tied}-{embeddings}")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == MODEL_TYPE and (out / "modeling_welore.py").exists()
    x = torch.randint(0, VOCAB, (2, 20))
    ours = load_compressed(out)
    theirs = AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=True).eval()
    assert type(theirs).__name__ == "WeLoreForCausalLM"
    assert {n: p.shape for n, p in theirs.named_parameters()} == {n: p.shape for n, p in ours.named_parameters()}
    with torch.no_grad():
        assert torch.equal(theirs(input_ids=x).logits, ours(input_ids=x).logits)
        assert torch.equal(ours(input_ids=x).logits, model(input_ids=x).logits)
    if embeddings and tied:  # the head and the embedding still share their two factors
        assert theirs.get_output_embeddings().weight_a is theirs.get_input_embeddings().weight_a
    # Without trust_remote_code the unknown model type is an error, not a dense model with missing weights.
    with pytest.raises(ValueError, match="trust_remote_code"):
        AutoModelForCausalLM.from_pretrained(str(out))


MINI_TASK = """task: gradlore_mini
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: multiple_choice
test_split: test
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
doc_to_choice: "{{{{choices}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""

QUESTIONS = [
    ("To be, or not to", [" be", " sing", " sleep"], 0),
    ("Now is the winter of our", [" discontent", " content", " delight"], 0),
    ("A horse! a horse! my kingdom for a", [" cow", " horse", " crown"], 1),
    ("O Romeo, Romeo! wherefore art thou", [" Romeo", " here", " going"], 0),
    ("The quality of mercy is not", [" strained", " bought", " found"], 0),
]


def write_task(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"question": q, "choices": c, "answer": a} for q, c, a in QUESTIONS]
    (folder / "mini.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "mini.yaml").write_text(MINI_TASK.format(data=folder / "mini.jsonl"))
    return folder


def test_lm_eval_scores_an_offline_task_on_a_compressed_model(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    text = resolve_corpus("tiny-shakespeare").read_text()
    tok = train_bpe([text], VOCAB)
    model = tiny("llama", True)
    compress(model, remove=0.3, cache_dir=tmp_path / "cache")
    out = save_compressed(model, tmp_path / "model", tokenizer=tok)
    tasks = write_task(tmp_path / "tasks")

    assert cli_main(["eval", "--model", str(out), "--tasks", "gradlore_mini", "--include-path", str(tasks),
                     "--json"]) == 0
    printed = capsys.readouterr().out
    result = json.loads(printed[printed.index("{"):])
    acc = result["results"]["gradlore_mini"]["acc,none"]

    # The same score by hand: the choice with the highest log-likelihood of its tokens after the question.
    loaded = load_compressed(out)
    hits = 0
    for question, choices, answer in QUESTIONS:
        context = tok.encode_batch([question])[0]
        scores = []
        for choice in choices:
            cont = tok.encode_batch([question + choice])[0][len(context):]
            ids = torch.tensor([context + cont])
            with torch.no_grad():
                logp = loaded(input_ids=ids).logits.log_softmax(-1)[0, len(context) - 1:-1]
            scores.append(float(logp.gather(1, torch.tensor(cont)[:, None]).sum()))
        hits += max(range(len(choices)), key=scores.__getitem__) == answer
    assert math.isclose(acc, hits / len(QUESTIONS))
    assert "gradlore_mini" in printed and "acc" in printed


def test_eval_without_data_or_tasks_is_an_error(tmp_path, capsys):
    assert cli_main(["eval", "--model", str(tmp_path / "nope")]) == 2
    assert "--data" in capsys.readouterr().err
