"""The `wafer` command line: the parser (`cli.main`), the flags commands share (`cli.flags`) and one
module per command. Only this package parses arguments or prints; `bench/` measures and reports."""
