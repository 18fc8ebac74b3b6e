"""Processing at egress (DESIGN rule 4): steps applied to a copy of an instance, per route."""
