"""The embedded world: a seeded bilingual world and every data set drawn from it."""
