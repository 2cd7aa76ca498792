"""Router modules: base.py holds the contract (Router, Routing, Capacity); one file per family."""
