"""`splitprefix demo`: the whole system on the shipped model, end to end, with a report."""
