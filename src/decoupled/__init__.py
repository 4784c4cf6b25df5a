"""Decoupled training of neural networks, compared on equal footing.

A network is a ``model.SplitNet``: K modules (``net.blocks``) and one classifier head per
module (``net.heads``; the last head is the network's output). Three pieces, each
replaceable on its own:

* **method** (``decoupled/methods/<name>.py``): how modules learn. One file per method; the
  registry finds it by its file name. The file defines a subclass of ``methods.base.Method``
  and ends with ``METHOD = ThatClass``. The interface::

      class Method:
          name: str                  # the name used in configs
          gradient_delay: int = 0    # sync mode: steps a gradient takes to cross a boundary
          input_buffer: str = "fifo" # async mode: "fifo" (each input once, in order) or "replay"
          def __init__(self, net: SplitNet, train_cfg: dict, total_steps: int)
              # build self.optimizers and self.schedulers (lists; see optim.make_optimizer)
          def module_step(self, k, inputs, labels) -> ModuleStep(outputs, loss, input_grad)
              # advance module k on one batch: forward, and update whatever the method
              # updates at this point; return the activations for module k+1, module k's
              # loss (detached) or None, and d loss / d inputs for module k-1 or None
          def receive_gradient(self, k, grad) -> Tensor | None
              # module k gets d loss / d outputs for its oldest batch awaiting one (DNI's
              # true gradient, DDG's delayed one); return what to pass on to module k-1
          def state_dict(self) / load_state_dict(self, state)
              # optimizer/scheduler/synthesizer/pending state for checkpoints

  Adding a method = one new file here + its name in a config's ``grid.methods``.
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
