"""A closed-world benchmark of LoRA composition: a tiny text-to-image model of coloured shapes.

Modules: `world` (the renderer and the concepts), `detector` (reads objects back from an image), `model` (loads the
base model into an object the standalone runner drives), `train` (base model and kohya-format concept LoRAs),
`evaluate` (merging vs CLoRA and its ablations).  See ``bench/shapes/README.md``.
"""
