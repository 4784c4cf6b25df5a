"""Decoupled training of neural networks, compared on equal footing.

A network is a ``model.SplitNet``: K modules (``net.blocks``) and one classifier head per
module (``net.heads``; the last head is the network's output). Three pieces, each
replaceable on its own:

* **method** (``decoupled/methods/<name>.py``): how modules learn. One file per method, which
  declares its traits (``TRAITS``, read without torch by the registry, ``decoupled.methods``)
  and a ``methods.base.Method`` subclass; the contract is ``Method``'s docstring. Adding a
  method = one new file + its name in a config's ``grid.methods``.
* **engine** (``decoupled/engines/``): who calls ``module_step`` / ``receive_gradient`` for
  which module and when. ``simulated`` is one deterministic process: in sync mode modules
  0..K-1 take each batch in lockstep; in async mode a schedule picks which module advances,
  through replay buffers or bounded queues between modules.
* **workflow** (``Snakefile``, ``workflow/rules``): expands the config's grid
  (``decoupled.grid``) into jobs and calls this package's CLI (``decoupled.cli``).

Data (``data``), evaluation (``evaluate``), tracking (``tracking``: MLflow) and the report
(``report``) are shared by every method.
"""

__version__ = "0.1.0"
