"""The UDA toolkit built on the gradharmony plug-in (``pip install 'gradharmony[uda]'``).

Methods (:mod:`gradharmony.uda.methods`: one file per UDA method, a batch to named losses and one
``update`` contract), backbones and heads (:mod:`~gradharmony.uda.models`), domains and benchmarks
(:mod:`~gradharmony.uda.data`), the training engine (:mod:`~gradharmony.uda.engine`), configs,
sweeps, run records, reports, plots and the ``gradharmony`` command.  A method knows nothing of GH;
the engine wires a method to a :class:`gradharmony.Harmonizer`.
"""
