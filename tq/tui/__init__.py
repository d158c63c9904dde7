"""``tq top``: the live Textual dashboard (talks to the broker only through AsyncClient)."""
