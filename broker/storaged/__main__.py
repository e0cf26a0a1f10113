"""``python -m broker.storaged``: one storage process (started by ``nhi-broker serve``)."""

import sys

from broker.storaged.server import main

sys.exit(main())
