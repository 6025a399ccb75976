"""Evaluation protocols on a pretrained backbone:
`python -m ssl_lab.eval eval=knn|linear|linear_fast|finetune|distill`.

The runner is ssl_lab/eval/run.py; each protocol is one file here and one YAML in conf/eval/.
"""
