"""The data owner: the ClientApp, DP-SGD (plain Opacus hooks and book-keeping), its privacy ledger and budget
guard, secure aggregation's client side, and `fedpriv client` (a SuperNode that runs only the code it trusts).

What the server needs too (run-config settings, datasets, training and evaluation, codecs) lives in `common/`.
"""
