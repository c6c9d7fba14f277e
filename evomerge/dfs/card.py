"""The DFS path drawn as text for the model card: one line per slot, ``source.layer x scale``.

>>> from evomerge.recipe import DFSRecipe
>>> r = DFSRecipe(sources={"a": "org/a", "b": "org/b"}, layers=[("a", 0), ("b", 2), ("a", 0)],
...               scales=[1.0, 0.8, 1.25], embed_from="a")
>>> print(path_diagram(r))
embed (a)
  |  x 1
slot 0 -> a.0
  |  x 0.8
slot 1 -> b.2
  |  x 1.25
slot 2 -> a.0  (a.0 again)
  |
norm, head (a)
"""

from __future__ import annotations

from evomerge.recipe import DFSRecipe


def path_diagram(recipe: DFSRecipe) -> str:
    """The path from the embeddings through every slot to the head, with each scale."""
    lines = [f"embed ({recipe.embed_from})"]
    seen: set[tuple[str, int]] = set()
    for t, ((name, index), scale) in enumerate(zip(recipe.layers, recipe.scales, strict=True)):
        again = f"  ({name}.{index} again)" if (name, index) in seen else ""
        seen.add((name, index))
        lines += [f"  |  x {scale:.6g}", f"slot {t} -> {name}.{index}{again}"]
    lines += ["  |", f"norm, head ({recipe.embed_from})"]
    return "\n".join(lines)


def dfs_method(recipe: DFSRecipe) -> str:
    """The model card's "Method" section for a dfs recipe."""
    used = len(set(recipe.layers))
    return (
        f"- data-flow path (DFS) of {len(recipe.layers)} slots over {used} distinct layers; "
        "`x s` multiplies the hidden state entering the slot\n"
        f"- embeddings, final norm and head: `{recipe.embed_from}`\n"
        f"- dtype: `{recipe.dtype or 'float32'}`\n"
        "- exported as a plain model: each slot a copied layer, its `o_proj`/`down_proj` "
        "divided by the product of the scales up to it (norms are scale-invariant)\n\n"
        f"```text\n{path_diagram(recipe)}\n```\n"
    )
