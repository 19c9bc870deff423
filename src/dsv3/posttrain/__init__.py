"""DeepSeek-R1's post-training on dsv3 models (SPEC §6; arXiv 2501.12948).

* :mod:`.chat`     — OpenAI-style ``messages`` records rendered with the model's chat template (the one
  the server uses), tokens with a mask of the assistant tokens; the SFT dataset (one record per row,
  right-padded, loss on assistant tokens only).
* :mod:`.sft`      — ``dsv3 sft``: the trainer (``dsv3.train``) on chat data, from an HF-layout model.
* :mod:`.rewards`  — rule-based rewards: accuracy (``\\boxed{…}`` / ``<answer>…</answer>`` compared
  exactly or numerically) and format (``<think>…</think>`` before the answer); pluggable by name or
  ``module:function``.
* :mod:`.loss`     — GRPO: group-normalised advantages, the clipped ratio objective, the k3 KL estimator.
* :mod:`.rollout`  — G samples per prompt from the batched inference engine on the *current* weights.
* :mod:`.grpo`     — ``dsv3 grpo``: the RL loop (checkpoints with exact resume, metrics, plots, export).
* :mod:`.sample`   — ``dsv3 sample``: rejection sampling into chat SFT data; accuracy with a binomial CI.
* :mod:`.task`     — a built-in verifiable task (multi-digit addition) with cold-start worked solutions.
"""
