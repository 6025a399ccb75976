from ssl_lab.eval.run import cli

cli()
