from overlap_bench.cli import main

main()
