"""`python -m align.zoo`: install the embedded default's shipped parts, or build them (`--force`)."""

from align.zoo.build import main

main()
