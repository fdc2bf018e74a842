"""TopoLM's library: what two or more commands share, one concept per module.

The commands at the top of the repository (train.py, analyze.py, ...) import from here; nothing
here imports a command. `model.py` and `positions.py` stay at the top (the model and the sheet)
and import only `topolm.config` of this package. The repository root must be on `sys.path`
(it is for every command, the preparers and the tests), so `model` and `positions` import by name.
"""
