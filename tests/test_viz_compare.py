"""Cross-model comparison figures: the numbers behind them, and offline HTML."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from plotly.offline import get_plotlyjs_version

from focuslens.causal.patching import PatchingResult
from focuslens.directions.artifact import FocusDirections
from focuslens.errors import DataError, ModelError
from focuslens.measure.scoring import HeadScores
from focuslens.measure.stats import spearman
from focuslens.viz import compare as C
from focuslens.viz import cross_model as X
from focuslens.viz.export import Figure
from focuslens.viz.heads import plot_topk_overlap

PLOTLY_JS = f"plotly.js v{get_plotlyjs_version()}"  # the banner of the inlined bundle

SHAPES = [(4, 3, 8), (6, 5, 16), (5, 4, 8)]  # odd and even head counts


def random_directions(shape, seed=0, ranked=True, name=None) -> FocusDirections:
    g = torch.Generator().manual_seed(seed)
    n_layers, n_heads, d = shape
    q, k = torch.randn(shape, generator=g) * 5, torch.randn(shape, generator=g) * 0.1
    order = torch.randperm(n_layers * n_heads, generator=g)
    ranking = [(int(i) // n_heads, int(i) % n_heads) for i in order] if ranked else []
    return FocusDirections(q, k, ranking, {"model": name or f"random-{n_layers}x{n_heads}"})


def random_scores(n_layers, n_heads, seed=0, metric="gold") -> HeadScores:
    g = torch.Generator().manual_seed(seed)
    return HeadScores(mean={metric: torch.rand(n_layers, n_heads, generator=g)}, metadata={"model": "m"})


def shared_trace(fig: Figure, name: str):
    """The trace of ``name`` in the shared-depth panel (the last column)."""
    return next(t for t in fig.data if t.type == "scatter" and t.mode == "markers" and t.name == name)


# ---------------------------------------------------------------- relative depth
def test_relative_depth_maps_first_and_last_layer_to_0_and_1():
    for n_layers in (30, 28, 2):
        assert C.relative_depth(0, n_layers) == 0.0
        assert C.relative_depth(n_layers - 1, n_layers) == 1.0
    assert C.relative_depth(14, 29) == 0.5
    assert C.relative_depth(0, 1) == 0.0
    assert torch.allclose(C.relative_depth(torch.arange(5), 5), torch.tensor([0, 0.25, 0.5, 0.75, 1.0]))


@pytest.mark.parametrize("top_k", [5, 20])
def test_head_locations_shared_panel_has_every_top_k_head_at_its_depth(top_k):
    deep, shallow = random_scores(30, 9, seed=1), random_directions((28, 28, 8), seed=2)
    # a ranking that includes the first and last layer, to pin 0 and 1
    ranking = [(27, 3), (0, 1), (13, 0), *[(layer, 2) for layer in range(1, 27)]]
    models = {"smol-like": deep, "qwen-like": shallow, "ranking": (ranking, 28, 4)}
    fig = X.plot_head_locations(models, top_k=top_k)
    assert isinstance(fig, Figure)
    expected = {
        "smol-like": [(layer / 29, r + 1) for r, (layer, _) in enumerate(deep.top_k(top_k))],
        "qwen-like": [(layer / 27, r + 1) for r, (layer, _) in enumerate(shallow.ranking()[:top_k])],
        "ranking": [(layer / 27, r + 1) for r, (layer, _) in enumerate(ranking[:top_k])],
    }
    for name, want in expected.items():
        trace = shared_trace(fig, name)
        assert len(trace.y) == top_k
        got = sorted(
            zip(np.asarray(trace.y, float), np.asarray(trace.customdata)[:, 2].astype(int)),
            key=lambda p: p[1],
        )
        assert np.allclose([y for y, _ in got], [y for y, _ in sorted(want, key=lambda p: p[1])])
        assert [r for _, r in got] == list(range(1, top_k + 1))
    ys = np.asarray(shared_trace(fig, "ranking").y, float)
    assert ys[0] == 1.0 and ys[1] == 0.0  # last layer at 1, first layer at 0
    # heatmaps: y axis in relative depth, from 0 to 1 for every model
    heat = {t.name: t for t in fig.data if t.type == "heatmap"}
    assert np.allclose(heat["smol-like"].y, np.arange(30) / 29)
    assert np.allclose(heat["qwen-like"].y, np.arange(28) / 27)
    # panel titles give the name and the shape
    titles = [a.text for a in fig.layout.annotations]
    assert any("smol-like" in t and "30 layers × 9 heads" in t for t in titles)
    assert any("qwen-like" in t and "28 layers × 28 heads" in t for t in titles)


def test_head_locations_of_one_small_model_say_how_many_heads_and_keep_the_subtitle_inside():
    ranking = [(layer, head) for layer in range(2) for head in range(4)]  # 8 heads in all
    fig = X.plot_head_locations({"tiny-llama": (ranking, 2, 4)}, top_k=20)
    title = fig.layout.title.text
    assert "top 8" in title and "top 20" not in title
    assert any(a.text.startswith("<b>top 8 heads") for a in fig.layout.annotations)
    lines = re.findall(r"<sup>(.*?)</sup>", title)
    assert len(lines) >= 2 and max(len(x) for x in lines) * 6.5 <= fig.layout.width  # wrapped to the width
    assert fig.layout.margin.t >= 130 + 18 * len(lines)  # the lines above the panels, not over them


def test_top_heads_table_and_metric_choice():
    scores = HeadScores(mean={"sink": torch.rand(3, 2), "gold": torch.arange(6.0).reshape(3, 2)})
    table = C.top_heads_table({"m": scores}, top_k=3)
    assert list(table[["layer", "head"]].itertuples(index=False, name=None)) == [(2, 1), (2, 0), (1, 1)]
    assert list(table["relative_depth"]) == [1.0, 1.0, 0.5]
    assert list(table["score"]) == [5.0, 4.0, 3.0]
    sink = C.top_heads_table({"m": scores}, top_k=1, metric="sink")
    assert (sink["layer"][0], sink["head"][0]) == scores.top_k(1, "sink")[0]
    # a partial ranking (NaN for unranked heads) gives only its ranked heads
    partial = HeadScores(mean={"rank_score": torch.tensor([[1.0, float("nan")], [0.0, float("nan")]])})
    assert len(C.top_heads_table({"p": partial}, top_k=5)) == 2


# ---------------------------------------------------------------- norm profile
def test_norm_profile_equals_direct_computation():
    dirs = {f"m{i}": random_directions(shape, seed=i) for i, shape in enumerate(SHAPES)}
    prof = C.norm_profile(dirs)
    for name, d in dirs.items():
        for vector, t in (("query", d.q), ("key", d.k)):
            norms = t.norm(dim=-1).numpy()  # [layer, head]
            p = prof[(prof.model == name) & (prof.vector == vector)].sort_values("layer")
            assert list(p.layer) == list(range(d.shape[0]))
            assert np.allclose(p["median"], np.median(norms, axis=1), rtol=1e-5)
            assert np.allclose(p["min"], norms.min(axis=1), rtol=1e-5)
            assert np.allclose(p["max"], norms.max(axis=1), rtol=1e-5)
            assert np.allclose(p["q25"], np.quantile(norms, 0.25, axis=1), rtol=1e-5)
            assert np.allclose(p["relative_depth"], np.arange(d.shape[0]) / (d.shape[0] - 1))
            if d.shape[1] % 2:  # odd head count: the median is a head's own norm
                assert np.allclose(p["median"], t.norm(dim=-1).median(dim=-1).values.numpy(), rtol=1e-5)


def test_norm_figure_has_query_and_key_per_model():
    dirs = {"a": random_directions((4, 3, 8)), "b": random_directions((6, 5, 16), seed=1)}
    fig = X.plot_direction_norms(dirs)
    lines = [t for t in fig.data if t.mode == "lines+markers"]
    assert {t.name for t in lines} == {"a: query ‖d_q‖", "a: key ‖d_k‖", "b: query ‖d_q‖", "b: key ‖d_k‖"}
    assert {t.line.dash for t in lines if "key" in t.name} == {"dash"}
    assert fig.layout.yaxis.type == "log"
    assert isinstance(X.plot_direction_norms(dirs, band="minmax"), Figure)


# ---------------------------------------------------------------- cosine
@pytest.mark.parametrize("shape", SHAPES)
def test_cosine_matrix(shape):
    d = random_directions(shape, seed=3)
    sim = C.cosine_matrix(d)
    n = min(20, shape[0] * shape[1])
    assert sim.shape == (n, n)
    assert list(sim.index) == [f"L{layer}H{head}" for layer, head in d.ranking()[:n]]
    m = sim.to_numpy()
    assert np.allclose(np.diag(m), 1, atol=1e-6)
    assert np.allclose(m, m.T, atol=1e-6)
    for a, b in [(0, 1), (2, n - 1), (n - 1, 1)]:
        (la, ha), (lb, hb) = d.ranking()[a], d.ranking()[b]
        direct = torch.nn.functional.cosine_similarity(d.q[la, ha], d.q[lb, hb], dim=0)
        assert m[a, b] == pytest.approx(float(direct), abs=1e-6)


def test_cosine_matrix_head_choices():
    d = random_directions((6, 5, 16), ranked=False)
    assert len(C.cosine_matrix(d)) == 30  # no ranking: every head
    heads = [(5, 4), (0, 0)]
    sim = C.cosine_matrix(d, heads, vector="k")
    direct = torch.nn.functional.cosine_similarity(d.k[5, 4], d.k[0, 0], dim=0)
    assert sim.loc["L5H4", "L0H0"] == pytest.approx(float(direct), abs=1e-6)
    zero = FocusDirections(torch.zeros(2, 2, 4), torch.zeros(2, 2, 4))
    assert np.isnan(C.cosine_matrix(zero).to_numpy()).all()  # no direction, no cosine
    fig = X.plot_direction_similarity(random_directions((4, 3, 8)))
    heat = fig.data[0]
    assert (heat.zmin, heat.zmax) == (-1, 1) and heat.x[0].startswith("L")


# ---------------------------------------------------------------- rank
def test_spearman_and_norm_rank_table():
    assert spearman([1, 2, 3, 4], [1, 4, 9, 16]) == 1.0
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == -1.0
    assert spearman([1, 2, 3, 4, 5], [2, 1, 4, 3, 5]) == pytest.approx(0.8)  # 1 − 6·4 / (5·24)
    assert np.isnan(spearman([1, 2, 3], [5, 5, 5]))
    d = random_directions((5, 4, 8))
    table = C.norm_rank_table({"m": d})
    assert list(table["rank"]) == list(range(1, 21))
    assert table["relative_rank"].iloc[-1] == 1.0
    layer, head = d.ranking()[0]
    assert table.q_norm.iloc[0] == pytest.approx(float(d.q[layer, head].norm()))
    fig = X.plot_norm_vs_rank({"m": d, "n": random_directions((3, 3, 4), seed=4)})
    assert len(fig.data) == 2 and all("Spearman ρ" in t.name for t in fig.data)
    assert isinstance(X.plot_norm_vs_rank({"m": d}, x="rank"), Figure)


# ---------------------------------------------------------------- overlap
def test_topk_overlap_table():
    a = [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0)]
    b = [(1, 1), (0, 0), (3, 3), (2, 2), (0, 1)]
    table = C.topk_overlap({"a": a, "b": b}, k=3)
    assert table.loc["a", "b"] == table.loc["b", "a"] == pytest.approx(1 / 3)  # only (0, 0) in both top 3
    assert table.loc["a", "a"] == table.loc["b", "b"] == 1.0
    assert C.topk_overlap({"a": a, "b": b}, k=5).loc["a", "b"] == pytest.approx(3 / 5)  # (0,0), (0,1), (1,1)
    scores = [random_scores(6, 5, seed=s) for s in range(3)]
    big = C.topk_overlap({f"s{i}": s for i, s in enumerate(scores)} | {"copy": scores[0].ranking()}, k=10)
    m = big.to_numpy()
    assert np.allclose(np.diag(m), 1) and np.allclose(m, m.T)
    assert big.loc["s0", "copy"] == 1.0
    fig = plot_topk_overlap({"a": a, "b": b}, k=3)
    assert fig.data[0].text[0][1] == "0.33<br>(1/3)" and fig.data[0].text[1][1] == "1.00<br>(3/3)"


def test_topk_depth_overlap_compares_depth_profiles_across_shapes():
    # a: 4 layers (depths 0, 1/3, 2/3, 1); b: 7 layers (depths 0, 1/6, ..., 1); 2 bins: [0, .5) and [.5, 1]
    a = ([(0, 0), (1, 0), (3, 0), (3, 1)], 4, 2)  # top 2: depths 0, 1/3 -> both in bin 0
    b = ([(6, 0), (5, 0), (0, 0), (1, 0)], 7, 1)  # top 2: depths 1, 5/6 -> both in bin 1
    c = ([(2, 0), (6, 0), (0, 0), (1, 0)], 7, 1)  # top 2: 1/3, 1 -> one in each bin
    table = C.topk_depth_overlap({"a": a, "b": b, "c": c}, k=2, bins=2)
    assert table.loc["a", "b"] == 0.0 and table.loc["a", "c"] == table.loc["b", "c"] == 0.5
    m = table.to_numpy()
    assert np.allclose(np.diag(m), 1) and np.allclose(m, m.T)
    assert C.topk_depth_overlap({"a": a, "b": b}, k=4, bins=1).loc["a", "b"] == 1.0  # one bin: always the same
    fig = plot_topk_overlap({"a": a, "b": b, "c": c}, k=2, by="depth", bins=2)
    assert fig.data[0].text[0][2] == "0.50" and "relative depths" in fig.layout.title.text
    with pytest.raises(DataError, match="by='layers'"):
        plot_topk_overlap({"a": a}, k=2, by="layers")
    with pytest.raises(DataError, match="bins=0"):
        C.topk_depth_overlap({"a": a}, k=2, bins=0)


def test_topk_overlap_reads_every_per_head_result_through_one_ranking_rule():
    nan = float("nan")
    gold = torch.tensor([[0.9, 0.1, 0.5], [0.3, 0.8, 0.0]])  # ranking (0,0) (1,1) (0,2) (1,0) ...
    scores = HeadScores(mean={"gold": gold}, metadata={"model": "m"})
    exact = torch.tensor([[nan, 0.7, 0.6], [0.2, nan, 0.9]])  # (1,2) (0,1) (0,2) (1,0); NaN heads never ranked
    patched = PatchingResult(scores={"exact": exact, "attribution": gold.flip(1)})  # first method: "exact"
    dirs = FocusDirections(torch.zeros(2, 3, 4), torch.zeros(2, 3, 4), [(1, 2), (0, 0), (0, 2), (1, 1)], {})
    table = C.topk_overlap({"gold": scores, "exact": patched, "attribution": (patched, "attribution"),
                            "tensor": exact, "dirs": dirs, "list": [(0, 0), (1, 1), (0, 2)]}, k=3)
    assert table.loc["gold", "exact"] == pytest.approx(1 / 3)  # only (0, 2)
    assert table.loc["gold", "list"] == 1.0 and table.loc["exact", "tensor"] == 1.0
    # attribution = gold mirrored by head: (0,2) (1,1) (0,0)
    assert table.loc["gold", "attribution"] == 1.0
    assert table.loc["dirs", "exact"] == pytest.approx(2 / 3)  # (1, 2) and (0, 2)
    assert table.loc["dirs", "gold"] == pytest.approx(2 / 3)  # (0, 0) and (0, 2)
    with pytest.raises(DataError, match=r"results\['p'\]: metric='gold' is not one of its methods"):
        C.topk_overlap({"p": patched, "s": scores}, k=2, metric="gold")
    with pytest.raises(DataError, match=r"results\['p'\] ranks 4 heads, fewer than k=5"):
        C.topk_overlap({"p": patched, "s": scores}, k=5)


# ---------------------------------------------------------------- bad input
def test_bad_input_raises_data_error_naming_the_field():
    with pytest.raises(DataError, match="models"):
        X.plot_head_locations({})
    with pytest.raises(ModelError, match=r"models\['bad'\].*\(5, 0\).*5 layers × 3 heads"):  # outside: ModelError
        X.plot_head_locations({"bad": ([(0, 0), (5, 0)], 5, 3)})
    with pytest.raises(ModelError, match=r"models\['bad'\].*\(0, 3\)"):
        C.top_heads_table({"bad": ([(0, 3)], 5, 3)})
    with pytest.raises(DataError, match="directions"):
        X.plot_direction_norms({})
    with pytest.raises(DataError, match="results"):
        C.topk_overlap({})
    with pytest.raises(DataError, match=r"results\['x'\]"):
        C.topk_overlap({"x": [(0, 0)], "y": [(0, 0)]}, k=2)
    with pytest.raises(ModelError, match=re.escape("head (4, 0) is outside the model's 4 layers × 3 heads")):
        C.cosine_matrix(random_directions((4, 3, 8)), [(4, 0)])  # one error class for "not a head of it"
    with pytest.raises(DataError, match="top_k"):
        X.plot_head_locations({"m": random_scores(3, 3)}, top_k=0)
    with pytest.raises(DataError, match="metric"):
        X.plot_head_locations({"m": random_scores(3, 3)}, metric="nope")
    with pytest.raises(DataError, match="ranking"):
        X.plot_head_locations({"m": random_directions((3, 3, 4), ranked=False)})
    with pytest.raises(DataError, match="different shapes"):
        C.topk_overlap({"a": random_scores(3, 3), "b": random_scores(4, 3)}, k=2)


# ---------------------------------------------------------------- offline HTML
_REMOTE = re.compile(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", re.I)
_SCRIPT = re.compile(r"(<script\b[^>]*>)(.*?)(</script>)", re.S | re.I)


def remote_references(html: str) -> list[str]:
    """Remote ``src=``/``href=`` in the page's markup and ``@import url(`` anywhere.

    Script *bodies* are left out of the markup check: the inlined plotly.js bundle holds
    string literals such as its modebar logo link (``t.href="https://plotly.com/"``) that
    the page never loads. The figure's own script (data and layout) is checked for any
    http(s) URL.
    """
    markup = _SCRIPT.sub(lambda m: m[1] + m[3], html)
    found = [m[0] for m in _REMOTE.finditer(markup)]
    figure_script = _SCRIPT.findall(html)[-1][1]
    found += re.findall(r"https?://\S{0,40}", figure_script)
    return found + (["@import url("] if "@import url(" in html else [])


def test_saved_html_is_self_contained(tmp_path):
    dirs = {"a": random_directions((4, 3, 8)), "b": random_directions((6, 5, 16), seed=1)}
    figures = {
        "locations": X.plot_head_locations(dirs, top_k=5),
        "norms": X.plot_direction_norms(dirs),
        "similarity": X.plot_direction_similarity(dirs["b"]),
        "rank": X.plot_norm_vs_rank(dirs),
        "overlap": plot_topk_overlap({"a": dirs["a"].ranking(), "b": random_scores(4, 3)}, k=5),
    }
    for name, fig in figures.items():
        (path,) = fig.save(tmp_path / name, formats=("html",))
        html = path.read_text()
        assert "Plotly.newPlot" in html and PLOTLY_JS in html  # plotly.js is inlined
        assert remote_references(html) == [], name


def test_remote_reference_check_catches_cdn_html(tmp_path):
    fig = X.plot_direction_norms({"a": random_directions((4, 3, 8))})
    fig.write_html(tmp_path / "cdn.html", include_plotlyjs="cdn")
    assert remote_references((tmp_path / "cdn.html").read_text())
    assert remote_references('<html><link href="//fonts.example/x.css"><script></script></html>')


# ---------------------------------------------------------------- the released directions
@pytest.fixture(scope="module")
def release(shared_data):
    from focuslens.directions.artifact import import_release

    root = shared_data / "focus-direction-release"
    dirs = {p.name: import_release(p) for p in sorted(root.iterdir()) if p.is_dir()}
    if len(dirs) < 2:
        pytest.skip(f"fewer than two released models under {root}")
    return dirs


def test_release_query_norms_far_above_key_norms(release):
    assert {d.shape[2] for d in release.values()} == {128}
    fig = X.plot_direction_norms(release)
    names = {t.name for t in fig.data if t.name}
    for model in release:
        assert f"{model}: query ‖d_q‖" in names and f"{model}: key ‖d_k‖" in names
    prof = C.norm_profile(release)
    for model, d in release.items():
        q = prof[(prof.model == model) & (prof.vector == "query")].set_index("layer")["median"]
        k = prof[(prof.model == model) & (prof.vector == "key")].set_index("layer")["median"]
        assert len(q) == d.shape[0]
        ratio = q / k
        # query norms ~20-30, key norms ~0.3: > 20x in the median layer and in almost every
        # layer; Qwen2.5-7B's layers 11-12 have key medians ~1.5 (ratio ~17), hence 10x per layer
        assert ratio.median() > 20 and (ratio > 20).mean() >= 0.9, f"{model}: {ratio.round(1).tolist()}"
        assert (ratio > 10).all(), f"{model}: query/key median ratio per layer {ratio.round(1).tolist()}"
        assert float(d.q.norm(dim=-1).median()) > 20 * float(d.k.norm(dim=-1).median())
    # the other figures accept the release too
    assert len(C.top_heads_table(release, top_k=20)) == 20 * len(release)
    assert len(X.plot_norm_vs_rank(release).data) == len(release)


# ---------------------------------------------------------------- one rank encoding
def _heat(fig: Figure, name: str):
    return next(t for t in fig.data if t.type == "heatmap" and t.name == name)


def test_a_released_ranking_gets_the_best_colour_for_its_best_head():
    ranking = [(3, 1), (0, 2), (5, 0), (2, 3), (1, 1), (4, 2)]
    released = HeadScores.from_ranking(ranking, n_layers=6, n_heads=4)  # rank_score runs 5 (best) … 0
    assert float(released["rank_score"][3, 1]) == 5  # what from_ranking stores: not a "1 = best" score
    dirs = random_directions((6, 4, 8), seed=3)
    ours = random_scores(6, 4, seed=4)
    # mixed: our scores (own colour bar) next to two rankings of different kinds
    fig = X.plot_head_locations({"ours": ours, "released": released, "dirs": dirs}, top_k=3)
    for name, best, last in (("released", ranking[0], ranking[-1]), ("dirs", dirs.ranking()[0], dirs.ranking()[-1])):
        heat = _heat(fig, name)
        z = np.asarray(heat.z, dtype=float)
        assert z[best] == 1.0 == heat.zmax and z[last] == 0.0 == heat.zmin, name  # best head: the top colour
        assert "1 = best" in heat.colorbar.title.text and "0 = last ranked" in heat.colorbar.title.text
    assert _heat(fig, "ours").zmax is None  # scores keep their own range
    # rankings only: one shared colour axis, 0 to 1, and both best heads at its top
    fig = X.plot_head_locations({"released": released, "dirs": dirs}, top_k=3)
    axis = fig.layout.coloraxis
    assert (axis.cmin, axis.cmax) == (0, 1) and "1 = best" in axis.colorbar.title.text
    for name, best in (("released", ranking[0]), ("dirs", dirs.ranking()[0])):
        assert np.asarray(_heat(fig, name).z, dtype=float)[best] == axis.cmax
