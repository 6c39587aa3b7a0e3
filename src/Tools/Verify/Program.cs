using NbdServer.Tools.Verify;

return await VerifyCommand.RunAsync(args);
