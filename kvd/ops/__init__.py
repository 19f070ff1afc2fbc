"""Operations: the kvd command line and kvctl."""
