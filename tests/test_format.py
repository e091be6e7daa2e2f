"""The packed model directory format is pinned, and docs/FORMAT.md describes it.

1. The tiny preset's layout (every tensor table row but the checksum, the expert
   block size, the file sizes, ALIGN and PART_ALIGN) is hashed per quantization
   setting and must
   equal the hash recorded for the current ``FORMAT_VERSION``. Any change in
   layout, dtypes, names or semantics needs a new format version: bump
   quant.packed.FORMAT_VERSION, update docs/FORMAT.md and record the new hashes
   under the new version in PINNED_LAYOUT (the old entries stay as history).
2. docs/FORMAT.md names the current version, the magic, the constants, every
   file and every manifest key the quantizer actually writes.
3. The worked example's tables in docs/FORMAT.md equal what the code computes
   (``python tests/test_format.py`` prints them, ready to paste).
"""
import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest

import quant.packed as packed
from quant.config import GrokConfig, preset
from quant.packed import (ALIGN, FORMAT_MAGIC, FORMAT_VERSION, MANIFEST, PART_ALIGN,
                          QuantSettings, entry_to_json, expert_block_layout, file_sizes,
                          tensor_layout)
from quant.int4_levels import STUDENT_T_LEVELS
from quant.qweight import BF16, QWeight, dequantize, pack_int4

try:
    from quant.pipeline import quantize_checkpoint
except ImportError:
    from quant.quantize import quantize_checkpoint

DOC = Path(__file__).resolve().parents[1] / "docs" / "FORMAT.md"

# The settings whose tiny-preset layout is pinned (label -> settings).
SETTINGS = {
    "int8": QuantSettings(8),
    "int4": QuantSettings(4),
    "int4-g32": QuantSettings(4, 32),
    "int8-bf16attn": QuantSettings(8, attention="bf16"),
    "int4-g32-levels": QuantSettings(4, 32, int4_levels=STUDENT_T_LEVELS),
    "int8-dense": QuantSettings(8, row_pad=0),
    "int8-tiles": QuantSettings(8, row_pad=0, tiles=True),
    "int4-g32-levels-tiles": QuantSettings(4, 32, int4_levels=STUDENT_T_LEVELS, row_pad=0,
                                           tiles=True),
    "int8-tiles-attention": QuantSettings(8, row_pad=0, tiles=True, attention_tiles=True),
    "int4-g32-levels-tiles-attention": QuantSettings(4, 32, int4_levels=STUDENT_T_LEVELS,
                                                     row_pad=0, tiles=True, attention_tiles=True),
}

# FORMAT_VERSION -> label -> SHA-256 of layout_json(preset("tiny"), settings).
PINNED_LAYOUT = {
    1: {
        "int8": "c18b3bf47b7fba6a009d96efd38d08dcc94d167087020d483b62ffd3161f9a01",
        "int4": "6010cf3696e9c786b7fa5c5b5142dce4990140d863dc2c3a1de2c3ec95701b62",
        "int4-g32": "e66d6a0ced0a77d167418f13d13b7304ae3ebab23828461f4568545c865f1a8e",
        "int8-bf16attn": "789c0c833db3ee3fe5b608061be38178fc6ef1e2d27ea935da64290db2d4ea89",
    },
    # Version 2 adds the manifest's and the tokenizer's checksums; the layout is unchanged.
    2: {
        "int8": "c18b3bf47b7fba6a009d96efd38d08dcc94d167087020d483b62ffd3161f9a01",
        "int4": "6010cf3696e9c786b7fa5c5b5142dce4990140d863dc2c3a1de2c3ec95701b62",
        "int4-g32": "e66d6a0ced0a77d167418f13d13b7304ae3ebab23828461f4568545c865f1a8e",
        "int8-bf16attn": "789c0c833db3ee3fe5b608061be38178fc6ef1e2d27ea935da64290db2d4ea89",
    },
    # Version 3 adds int4 level tables (quant.int4_levels, the rows' `levels`); a model
    # without them has version 2's layout.
    3: {
        "int8": "c18b3bf47b7fba6a009d96efd38d08dcc94d167087020d483b62ffd3161f9a01",
        "int4": "6010cf3696e9c786b7fa5c5b5142dce4990140d863dc2c3a1de2c3ec95701b62",
        "int4-g32": "e66d6a0ced0a77d167418f13d13b7304ae3ebab23828461f4568545c865f1a8e",
        "int8-bf16attn": "789c0c833db3ee3fe5b608061be38178fc6ef1e2d27ea935da64290db2d4ea89",
        "int4-g32-levels": "14268244fa4e6ff4b1c186d2d9e3d2a37fa79f6902bd82d57a907c0af3ba18b6",
    },
    # Version 4 pads each row of expert values (quant.row_pad, 64 by default); with
    # row_pad 0 the layout is version 3's (int8-dense = version 3's int8).
    4: {
        "int8": "d531750b351d02be3616f52ea759b8b5b6590e2a7b84860f80c7d6eee1df6528",
        "int4": "b99525b1c4b6eac667bb175a4d081b6261ce5f5a28438ced0448a4d65198864b",
        "int4-g32": "802dae8e471ad6fc35ffeb5fe59a0ac400fee819293bfc6eb3487c395168c3e2",
        "int8-bf16attn": "1a38319ed026efebc194bdb575ba180845ed4405e551eefe2b167a9815fccf85",
        "int4-g32-levels": "4820b5c11c1f7f088a29a0352166e0c90b09a7c8bea9b7a792a14ec8036f25dc",
        "int8-dense": "c18b3bf47b7fba6a009d96efd38d08dcc94d167087020d483b62ffd3161f9a01",
    },
    # Version 5 may store expert values in tiles (quant.tiles, the quantizer's default;
    # the values rows' `tiled`); a model without them has version 4's layout.
    5: {
        "int8": "d531750b351d02be3616f52ea759b8b5b6590e2a7b84860f80c7d6eee1df6528",
        "int4": "b99525b1c4b6eac667bb175a4d081b6261ce5f5a28438ced0448a4d65198864b",
        "int4-g32": "802dae8e471ad6fc35ffeb5fe59a0ac400fee819293bfc6eb3487c395168c3e2",
        "int8-bf16attn": "1a38319ed026efebc194bdb575ba180845ed4405e551eefe2b167a9815fccf85",
        "int4-g32-levels": "4820b5c11c1f7f088a29a0352166e0c90b09a7c8bea9b7a792a14ec8036f25dc",
        "int8-dense": "c18b3bf47b7fba6a009d96efd38d08dcc94d167087020d483b62ffd3161f9a01",
        "int8-tiles": "6d52e1e1fe9cf3ac823db9f43e4d9216a6f40560d48941e8f239c0e8c05fbb6c",
        "int4-g32-levels-tiles":
            "8aa84c8aed09c535b4f20d0cc81cda8503bfb46b4912e08bd94dc92412fae24d",
    },
}

# Version 6 may store int8 attention values in tiles (quant.attention_tiles, the
# quantizer's default with tiles; tiny's 32-column k and v stay rows); a model without
# them has version 5's layout.
PINNED_LAYOUT[6] = {
    **PINNED_LAYOUT[5],
    "int8-tiles-attention": "6a19d5b4d49a9d15fa95c8939e1ea18379d77b3fb164f770d388c3d9e8a95974",
    "int4-g32-levels-tiles-attention":
        "a222cbd4238104a996cc9d110af89ae648e2b35d8d145924f4aea5a62bdb05c4",
}

# Version 7 changes the byte order inside int4 tiles (each 4 rows of a column in one
# 32-bit word); shapes, offsets and sizes, and so every layout hash, are version 6's.
PINNED_LAYOUT[7] = dict(PINNED_LAYOUT[6])

BUMP = "bump quant.packed.FORMAT_VERSION and update docs/FORMAT.md"


def layout_json(cfg: GrokConfig, settings: QuantSettings) -> str:
    """Canonical JSON of a layout: table rows without checksums, block size, file sizes
    and the alignment constants (tiny's power-of-two sizes hide some PART_ALIGN changes)."""
    entries = tensor_layout(cfg, settings)
    _, block = expert_block_layout(cfg, settings)
    data = {"tensors": [entry_to_json(e, None) for e in entries],
            "expert_block_nbytes": block, "files": file_sizes(entries),
            "align": packed.ALIGN, "part_align": packed.PART_ALIGN}
    return json.dumps(data, sort_keys=True, separators=(",", ":"))


def layout_hash(cfg: GrokConfig, settings: QuantSettings) -> str:
    return hashlib.sha256(layout_json(cfg, settings).encode()).hexdigest()


@pytest.fixture(scope="module")
def doc() -> str:
    return DOC.read_text()


# --- 1. the layout is pinned per format version -------------------------------------

@pytest.mark.parametrize("label", sorted(SETTINGS))
def test_tiny_layout_is_pinned_for_this_format_version(label):
    pinned = PINNED_LAYOUT.get(FORMAT_VERSION)
    assert pinned is not None, (
        f"no layout hashes recorded for FORMAT_VERSION {FORMAT_VERSION}: record them in "
        f"tests/test_format.py PINNED_LAYOUT (and {BUMP})")
    found = layout_hash(preset("tiny"), SETTINGS[label])
    assert found == pinned[label], (
        f"the packed layout of the tiny preset ({label}) changed: sha256 {found}, pinned "
        f"{pinned[label]} for FORMAT_VERSION {FORMAT_VERSION}. A change in layout, dtypes, "
        f"names or semantics is a new format: {BUMP}, then add the new hashes under the "
        f"new version in PINNED_LAYOUT")


def test_pinned_versions_are_not_ahead_of_the_code():
    assert max(PINNED_LAYOUT) == FORMAT_VERSION, (
        f"PINNED_LAYOUT has versions {sorted(PINNED_LAYOUT)} but FORMAT_VERSION is "
        f"{FORMAT_VERSION}: {BUMP}")


# --- 2. the doc names everything the quantizer writes -------------------------------

@pytest.fixture(scope="module")
def manifests(tiny_cfg, tiny_ckpt, tmp_path_factory):
    """Real manifests (as written to disk) and file names: int8 and int4 g32."""
    root = tmp_path_factory.mktemp("format")
    out = {}
    for label in ("int8", "int4-g32", "int4-g32-levels", "int8-tiles", "int8-tiles-attention"):
        model = root / label
        quantize_checkpoint(tiny_ckpt, model, tiny_cfg, SETTINGS[label])
        out[label] = (json.loads((model / MANIFEST).read_text()),
                      sorted(p.name for p in model.iterdir()))
    return out


def mentioned(doc: str, word) -> bool:
    """``word`` appears in code formatting (`word` or inside a code block line)."""
    word = str(word)
    if f"`{word}`" in doc:
        return True
    in_block = False
    for line in doc.splitlines():
        if line.startswith("```"):
            in_block = not in_block
        elif in_block and re.search(rf"(?<![\w.]){re.escape(word)}(?![\w])", line):
            return True
    return False


def test_doc_names_version_magic_and_constants(doc):
    assert f"FORMAT_VERSION = {FORMAT_VERSION}" in doc, f"docs/FORMAT.md must describe " \
        f"FORMAT_VERSION = {FORMAT_VERSION} (the doc and the code disagree: {BUMP})"
    assert f'"format_version": {FORMAT_VERSION}' in doc
    assert f'"{FORMAT_MAGIC}"' in doc
    assert f"ALIGN = {ALIGN}" in doc and f"PART_ALIGN = {PART_ALIGN}" in doc


def test_doc_names_every_manifest_key_and_file(doc, manifests):
    missing = set()
    for manifest, files in manifests.values():
        keys = set(manifest)
        keys |= {k for row in manifest["tensors"] for k in row}
        keys |= set(manifest["config"]) | set(manifest["quant"])
        keys |= {k for s in manifest["quant_error_summary"].values() for k in s}
        keys |= set(manifest.get("int4_method", {}))
        values = {row[k] for row in manifest["tensors"] for k in ("role", "part", "dtype")}
        names = {re.sub(r"\d\d", "LL", f) for f in files}
        missing |= {w for w in keys | values | names if not mentioned(doc, w)}
    assert not missing, f"docs/FORMAT.md does not mention {sorted(missing)} ({BUMP})"
    assert manifests["int8"][0]["format_version"] == FORMAT_VERSION


# --- 3. the worked example's numbers are the code's -----------------------------------

def _shape(shape) -> str:
    return "[" + ", ".join(map(str, shape)) + "]"


def block_rows(cfg: GrokConfig, settings: QuantSettings) -> list[str]:
    parts, block = expert_block_layout(cfg, settings)
    rows = [f"| `{p.name}` | {p.offset} | {_shape(p.shape)} | {p.dtype} | {p.group_size} | "
            f"{p.nbytes} |" for p in parts]
    return rows + [f"| block: end of `down.scales` rounded up to `ALIGN` | | | | | {block} |"]


def file_rows(cfg: GrokConfig, labels: list[str]) -> list[str]:
    sizes = [file_sizes(tensor_layout(cfg, SETTINGS[label])) for label in labels]
    rows = [f"| `{name}` | " + " | ".join(str(s[name]) for s in sizes) + " |"
            for name in sizes[0]]
    blocks = [expert_block_layout(cfg, SETTINGS[label])[1] for label in labels]
    return rows + ["| total | " + " | ".join(str(sum(s.values())) for s in sizes) + " |",
                   "| `expert_block_nbytes` | " + " | ".join(map(str, blocks)) + " |",
                   "| tensors | " + " | ".join(str(len(tensor_layout(cfg, SETTINGS[label])))
                                              for label in labels) + " |"]


def entry_rows(cfg: GrokConfig, settings: QuantSettings, count: int) -> list[str]:
    return [f"| {i} | `{e.name}` | `{e.file}` | {e.offset} | {_shape(e.shape)} | {e.dtype} | "
            f"{e.nbytes} |" for i, e in enumerate(tensor_layout(cfg, settings)[:count])]


GROK1 = {"int8": QuantSettings(8), "int4": QuantSettings(4), "int4-g128": QuantSettings(4, 128),
         "int4-g32": QuantSettings(4, 32)}


def grok1_rows() -> list[str]:
    cfg, rows = preset("grok-1"), []
    for label, settings in GROK1.items():
        sizes = file_sizes(tensor_layout(cfg, settings))
        rows.append(f"| {label} | {expert_block_layout(cfg, settings)[1]} | "
                    f"{sizes['layer_00.experts.bin']} | {sizes['layer_00.resident.bin']} | "
                    f"{sizes['global.bin']} | {sum(sizes.values())} |")
    return rows


def example_sections() -> dict[str, list[str]]:
    tiny = preset("tiny")
    return {
        "expert block, int8": block_rows(tiny, SETTINGS["int8"]),
        "expert block, int4": block_rows(tiny, SETTINGS["int4"]),
        "expert block, int4 g32": block_rows(tiny, SETTINGS["int4-g32"]),
        "file sizes": file_rows(tiny, list(SETTINGS)),
        "first table rows, int8": entry_rows(tiny, SETTINGS["int8"], 22),
        "grok-1": grok1_rows(),
    }


@pytest.mark.parametrize("section", sorted(example_sections()))
def test_worked_example_matches_the_code(doc, section):
    lines = set(doc.splitlines())
    missing = [row for row in example_sections()[section] if row not in lines]
    assert not missing, (f"docs/FORMAT.md worked example ({section}) lacks these rows "
                         f"(print them with `python tests/test_format.py`): {missing}")


def test_int4_nibble_example_in_doc(doc):
    """The doc's byte example: rows 0 and 1 = -3 and 5 pack to 0x5D; scale 0.5."""
    q = np.array([[-3], [5]], np.int8)
    packed = pack_int4(q)
    assert packed.tolist() == [[0x5D]]
    w = QWeight(packed, np.array([[0.5]], BF16), 4, 2)
    assert dequantize(w).tolist() == [[-1.5], [2.5]]
    assert "0x5D" in doc and "-1.5" in doc and "2.5" in doc


def test_int4_levels_example_in_doc(doc):
    """The same byte with the default level table: nibbles 13 and 5 -> 67 and -29."""
    w = QWeight(np.array([[0x5D]], np.uint8), np.array([[0.5]], BF16), 4, 2, STUDENT_T_LEVELS)
    assert dequantize(w).tolist() == [[33.5], [-14.5]]
    assert "`L[13]` = 67 and `L[5]` = -29" in doc and "33.5 and -14.5" in doc
    assert str(list(STUDENT_T_LEVELS)) in doc


if __name__ == "__main__":
    for label, settings in SETTINGS.items():
        print(f"{label}: {layout_hash(preset('tiny'), settings)}")
    for title, rows in example_sections().items():
        print(f"\n{title}:")
        print("\n".join(rows))
