from service.cli import service_main

service_main()
