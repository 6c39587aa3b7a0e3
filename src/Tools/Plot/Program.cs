using NbdServer.Tools.Plotting;

return PlotCommand.Run(args, Console.Out, Console.Error);
