"""udiRoot.conf: the key table with its defaults (udiroot), the value parsers (values),
and the epilog's and shifter's quick reader of the few keys they need (quick).
"""
