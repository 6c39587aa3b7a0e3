using NbdServer.Tools.Verify;

return await VerifyCommandLine.Program.RunAsync(args);
