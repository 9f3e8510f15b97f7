"""Property tests: random valid specs survive YAML -> IR -> DSL -> IR -> YAML unchanged,
and no edit of valid DSL text makes the parser raise anything but the project's error."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moecompose import MoeComposeError
from moecompose.spec import dump_yaml, parse_spec
from moecompose.spec.formatter import format_dsl, format_yaml
from moecompose.spec.schema import TRAIN_NAMES, Spec

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

names = st.from_regex(r"[A-Za-z_][A-Za-z0-9_.-]{0,5}", fullmatch=True)
text = st.text(st.characters(blacklist_categories=("Cs", "Cc")), max_size=12)
paths = st.one_of(st.sampled_from(["./dense/seed", "../x", "/abs/dir", "~/m", "data/*.txt"]), text)
small = st.floats(min_value=0.0, max_value=10.0, allow_nan=False, allow_infinity=False)
positive = st.floats(min_value=1e-6, max_value=10.0, allow_nan=False, allow_infinity=False)


def maybe(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(st.just(None), strategy)


@st.composite
def specs(draw: st.DrawFn) -> Spec:
    sources = draw(st.dictionaries(names, paths, min_size=1, max_size=3))
    src = st.sampled_from(sorted(sources))
    data: dict[str, Any] = {"moecompose": 1, "sources": sources}
    if draw(st.booleans()):
        data["name"] = draw(text)
    if draw(st.booleans()):
        data["seed"] = draw(st.integers(0, 2**40))
    data["merge"] = draw(st.one_of(
        st.just("average"),
        st.builds(lambda s: {"from": s}, src),
        st.builds(lambda w: {"weights": w}, st.dictionaries(src, st.floats(0.1, 5), min_size=1)),
    ))
    data["block"] = draw(maybe(st.sampled_from(["sequential", "parallel"])))
    if draw(st.booleans()):
        domain = st.one_of(
            st.fixed_dictionaries({"texts": paths}, optional={
                "max_docs": st.integers(1, 500), "max_tokens": st.integers(1, 4096)}),
            st.fixed_dictionaries({"embedding": paths}, optional={"key": src}),
        )
        data["domains"] = draw(st.dictionaries(src, domain, max_size=2))
        data["embed_with"] = draw(maybe(src))
    texts = st.lists(st.sampled_from(
        ["def parse(x):", "the court held", 'a "quoted" word', "x = 1; y = 2", "", "naïve #1"]
    ), min_size=1, max_size=3)
    prompt_init = st.fixed_dictionaries(
        {"prompts": st.dictionaries(src, texts, min_size=1, max_size=2)},
        optional={"negative": st.dictionaries(src, texts, max_size=2), "source": src,
                  "max_tokens": st.integers(1, 4096)},
    )
    routers = st.one_of(
        st.fixed_dictionaries({"kind": st.just("topk")}, optional={
            "k": st.integers(1, 8), "normalize": st.booleans(),
            "init": st.one_of(st.sampled_from(["random", "zeros"]), prompt_init),
            "init_std": positive}),
        st.fixed_dictionaries({"kind": st.just("soft")}, optional={"init_std": positive}),
        st.fixed_dictionaries({"kind": st.just("nexus")}, optional={
            "k": st.integers(1, 4), "normalize": st.booleans()}),
        st.fixed_dictionaries({"kind": st.just("token_mixing"), "group_size": st.integers(1, 64)},
                              optional={"temperature": positive, "learn_temperature": st.booleans()}),
    )
    experts = st.one_of(
        st.lists(src, min_size=1, max_size=4),
        st.fixed_dictionaries({"copy": src, "count": st.integers(1, 64)},
                              optional={"drop": st.floats(0.0, 0.99)}),
        st.fixed_dictionaries({"adapters": src, "count": st.integers(1, 64)},
                              optional={"bottleneck": st.integers(1, 512), "scale": small}),
    )
    ffn = st.fixed_dictionaries({"experts": experts}, optional={
        "shared": src, "router": routers,
        "aux_loss": st.fixed_dictionaries({}, optional={"load_balance": small, "z_loss": small}),
    })
    attention = st.fixed_dictionaries({"experts": st.lists(src, min_size=1, max_size=3)}, optional={
        "share": st.sampled_from([[], ["k", "v"]]), "router": routers})

    @st.composite
    def ranges(draw: st.DrawFn) -> dict[str, int]:
        start = draw(st.integers(0, 30))
        out = draw(st.fixed_dictionaries({}, optional={"every": st.integers(1, 4)}))
        if draw(st.booleans()):
            out["from"] = start
        if draw(st.booleans()):
            out["to"] = out.get("from", 0) + draw(st.integers(1, 30))
        return out

    select = st.one_of(st.just("all"), st.lists(st.integers(0, 40), max_size=4), ranges())
    rules = st.fixed_dictionaries({"select": select}, optional={"ffn": ffn, "attention": attention})
    data["layers"] = [r for r in draw(st.lists(rules, max_size=3)) if "ffn" in r or "attention" in r]
    if draw(st.booleans()):
        data["train"] = draw(st.lists(st.sampled_from(TRAIN_NAMES), min_size=1, max_size=3))
    data["output"] = draw(st.fixed_dictionaries({}, optional={
        "dtype": st.sampled_from(["float32", "bfloat16", "float16"]),
        "format": st.sampled_from(["auto", "native", "mixtral", "qwen2_moe"]),
        "max_shard_size": st.integers(1, 10**12),
    }))
    return Spec.model_validate(data)


@SETTINGS
@given(specs(), st.booleans())
def test_yaml_to_dsl_and_back_changes_nothing(spec: Spec, full: bool) -> None:
    yaml_text = dump_yaml(spec)
    from_yaml = parse_spec(yaml_text, check=False)
    dsl_text = format_dsl(from_yaml, full=full)
    from_dsl = parse_spec(dsl_text, syntax="dsl", check=False)
    assert from_dsl == spec, dsl_text
    assert dump_yaml(from_dsl) == yaml_text
    assert parse_spec(format_yaml(spec, full=full), check=False) == spec


@SETTINGS
@given(specs())
def test_formatting_is_idempotent(spec: Spec) -> None:
    once = format_dsl(spec)
    assert format_dsl(parse_spec(once, syntax="dsl", check=False)) == once


VALID = [path.read_text() for path in sorted((ROOT / "specs").glob("*.moe"))]
PIECES = [*"{}[]()=,;#\"'\n:.-/ ", "..", "every", "topk(", "copy(", "k=", "layers all {",
          "\\", "1e999", "9" * 30, "true", "null", "\t", "é", "\x00"]


@st.composite
def mutated(draw: st.DrawFn) -> str:
    text = draw(st.sampled_from(VALID))
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(text)))
        j = draw(st.integers(i, min(len(text), i + 12)))
        edit = draw(st.sampled_from(["delete", "insert", "replace", "duplicate"]))
        piece = draw(st.one_of(st.sampled_from(PIECES), st.text(max_size=3)))
        if edit == "delete":
            text = text[:i] + text[j:]
        elif edit == "insert":
            text = text[:i] + piece + text[i:]
        elif edit == "replace":
            text = text[:i] + piece + text[j:]
        else:
            text = text[:j] + text[i:j] + text[j:]
    return text


@settings(max_examples=300, deadline=None)
@given(mutated())
def test_edited_dsl_text_raises_only_the_projects_errors(text: str) -> None:
    try:
        parse_spec(text, file="edited.moe", base_dir=ROOT / "specs")
    except MoeComposeError as exc:
        assert exc.location is not None and exc.location.file == "edited.moe"
        assert "\n" not in exc.format()
