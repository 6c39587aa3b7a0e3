using NbdServer.Tools.Certs;

return CertsCommand.Run(args, Console.Out, Console.Error, TimeProvider.System);
