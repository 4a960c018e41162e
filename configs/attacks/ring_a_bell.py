r"""Ring-A-Bell (``jaxsafe.attacks.ring_a_bell``, ``jaxsafe.attacks.run.ring_a_bell_prompts``).

    python -m launch.attack --config=configs/attacks/ring_a_bell.py:sd --model=... \
        --original=... --prompts=prompts.txt --pairs=pairs.tsv --judge=nudenet --out=/tmp/rab

The search runs on the ``--original`` model's text encoder only; the found prompts are judged
on ``--model``. ``sd``: ``InversePrompt.ipynb``: K = 16 tokens, η = 3, population 200, 3,000
generations, mutation rate 0.25. ``testbed``: K = 8, population 64, 300 generations. The
concept-vector pairs: ``--pairs`` (a TSV of prompt-with / prompt-without lines), or on the test
bed ``shapes_metrics.concept_pairs`` (16 pairs).
"""

from configs.attacks import common


def get_config(arg=None):
    c = common.base("ring_a_bell", arg)
    c.length, c.eta, c.population, c.generations = 16, 3.0, 200, 3000
    c.mutate_rate, c.elite, c.num_pairs = 0.25, 1, 16
    if c.variant == "testbed":
        c.length, c.population, c.generations = 8, 64, 300
    if c.variant == "smoke":
        c.length, c.population, c.generations, c.num_pairs = 4, 8, 4, 4
    return c
