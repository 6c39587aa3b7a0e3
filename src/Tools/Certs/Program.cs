using NbdServer.Tools.Certs;

return CertsCommandLine.Program.Run(args);
