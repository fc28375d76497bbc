from kimi_desktop.cli import main
import sys
sys.exit(main())
