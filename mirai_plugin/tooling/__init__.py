"""What sits beside the training path: the ``mirai-plugin`` command and what it runs.

``cli`` (the command; each subcommand imports its module when it runs), ``patching``
(the patch command), ``demo/`` (the toy worlds, models, experiment and report; needs the
``[demo]`` extra), ``eval/`` (VBench scores, the paired bootstrap, consistency formulas,
the VBench runner), ``probe`` (the representation probe), ``flops`` and ``memory`` (what
the term costs). Nothing in the core package imports from here.
"""
