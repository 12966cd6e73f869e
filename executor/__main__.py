"""`python -m executor --model M --plan P --nproc N --out DIR ...` (the same as `ditplan run`)."""
import sys

from executor.launch import main

sys.exit(main())
