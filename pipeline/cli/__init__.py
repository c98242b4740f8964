"""Click commands only: parse options, call the library, print. One module per stage."""
