from kdrun.report.tables import main

main()
