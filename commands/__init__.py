"""One module per verb of `python main.py VERB ...`, each with the same three names:

    HELP                  one line for the verb's --help
    add_arguments(parser) its arguments, on an argparse parser of its own
    run(args) -> int      do it; the exit code (a UserError raised here is printed as one line, code 2)

main.py imports only the module of the verb it runs, so that `new`, `list` and `compare` start
without torch. A verb too large for one module keeps its parts beside it as <verb>_<part>.py
(sweep: sweep_file, sweep_worker, sweep_report); those are not verbs."""
