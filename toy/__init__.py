"""The toy setting of the demo and the reproduction: 3-digit addition with a column-wise scratchpad.

`task.py` defines problems, solutions, the held-out split and the tokenizer; `train_teacher.py` trained the
committed teacher in `assets/teacher`; `make_students.py` made the weak and strong students in `assets/`.
"""
